#!/usr/bin/env python3
"""Plots of a `pikv bench --json` document (docs/performance.md).

    bench_plot.py RESULTS.json [--out DIR]

writes three PNGs into DIR (default: the JSON's directory):
  bench-roofline.png  dense decode attention: achieved KV bytes/s as a share of the
                      device's measured read bandwidth, against context, per device,
                      dtype and batch
  bench-speedup.png   speedup over dense f16 against context, per device: quest budgets
                      and expert selection (over dense on the same cache) and int8/int4
                      pages (over f16), each with its ideal (the bytes ratio) dashed
  bench-memory.png    bytes per device for each placement of the memory section, with
                      the imbalance (max/mean)
Needs matplotlib (tools/setup-model.sh installs it in the project's venv).
"""
import argparse
import json
import math
import os
import sys


def finite(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--out", help="directory of the PNGs (default: the JSON's directory)")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_plot.py: matplotlib is not installed (tools/setup-model.sh installs it)", file=sys.stderr)
        return 2
    with open(a.json) as f:
        d = json.load(f)
    out = a.out or os.path.dirname(os.path.abspath(a.json))
    os.makedirs(out, exist_ok=True)
    pts = d["points"]
    devices = [x["name"] for x in d["devices"]]
    title = "pikv bench %s, commit %s\n%s, %d cores" % (d["date"][:10], d["commit"], d["host"]["cpu"],
                                                         d["host"]["cores"])
    styles = {"f16": "-", "int8": "--", "int4": ":", "f32": "-."}

    # 1. share of the read roofline
    fig, axes = plt.subplots(1, len(devices), figsize=(5 * len(devices), 4), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        series = {}
        for p in pts:
            if p["device"] == dev and p["kind"] == "dense" and finite(p["share_of_read"]):
                series.setdefault((p["dtype"], p["batch"]), []).append((p["context"], 100 * p["share_of_read"]))
        for (dt, b), xy in sorted(series.items()):
            xy.sort()
            ax.plot([x for x, _ in xy], [y for _, y in xy], styles.get(dt, "-"), marker="o", ms=3,
                    label="%s, batch %d" % (dt, b))
        ax.axhline(80, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(dev)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("% of measured read bandwidth")
        if series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no roofline measured", transform=ax.transAxes, ha="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench-roofline.png"), dpi=110)
    plt.close(fig)

    # 2. speedups, batch 1
    fig, axes = plt.subplots(1, len(devices), figsize=(5 * len(devices), 4), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        series = {}
        for p in pts:
            if p["device"] != dev or p["batch"] != 1 or not finite(p["speedup"]):
                continue
            if p["kind"] == "quest" and p["dtype"] == "f16":
                key = "quest 1/%d" % p["param"]
            elif p["kind"] == "experts":
                key = "experts %d of %d" % (p["param"], p["n_experts"])
            elif p["kind"] == "dense" and p["dtype"] in ("int8", "int4"):
                key = "%s over f16" % p["dtype"]
            else:
                continue
            series.setdefault(key, []).append((p["context"], p["speedup"], p["ideal_speedup"]))
        for i, (key, xyz) in enumerate(sorted(series.items())):
            xyz.sort()
            color = "C%d" % (i % 10)
            ax.plot([x for x, _, _ in xyz], [y for _, y, _ in xyz], "-", marker="o", ms=3, color=color, label=key)
            ax.plot([x for x, _, _ in xyz], [z for _, _, z in xyz], "--", color=color, lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title("%s, batch 1 (dashed: ideal = bytes ratio)" % dev, fontsize=9)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("speedup")
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench-speedup.png"), dpi=110)
    plt.close(fig)

    # 3. memory per device
    mem = d.get("memory", [])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if mem:
        n = max(m["n_devices"] for m in mem)
        width = 0.8 / n
        for j in range(n):
            xs = [i + j * width for i in range(len(mem))]
            ys = [m["bytes_used"][j] / 2 ** 20 if j < len(m["bytes_used"]) else 0 for m in mem]
            ax.bar(xs, ys, width, label="device %d" % j)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mem))])
        ax.set_xticklabels(["%s\nimbalance %.2f" % (m["placement"], m["imbalance"]) for m in mem])
        ax.set_ylabel("MiB of pages")
        ax.legend(fontsize=7)
    ax.set_title("memory per device (MoE cache, skewed routing)", fontsize=9)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench-memory.png"), dpi=110)
    plt.close(fig)
    print("wrote %s/bench-{roofline,speedup,memory}.png" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
