#!/usr/bin/env python3
"""Plot of `pikv eval`'s JSON (docs/eval.md): accuracy against KV memory.

usage: eval_plot.py RESULTS.json OUT.png

Left: perplexity against the KV bytes each configuration stores (mean at the end of a
chunk), one marker style per policy family, dense and MoE models apart, the baselines'
perplexity as dotted lines. Middle: perplexity against the KV bytes read per attend.
Right: passkey retrieval accuracy against the prompt length, one line per configuration.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def family(name):
    for f in ("quest", "streaming", "h2o", "pyramid", "moe-k", "experts", "pikv", "int", "full",
              "moe-full", "evict"):
        if name.startswith(f):
            return f
    return name


STYLE = {
    "full": ("black", "o"), "moe-full": ("black", "s"), "int": ("tab:gray", "D"),
    "quest": ("tab:blue", "^"), "streaming": ("tab:orange", "v"), "h2o": ("tab:green", "<"),
    "pyramid": ("tab:red", ">"), "moe-k": ("tab:purple", "s"), "experts": ("tab:brown", "P"),
    "pikv": ("tab:pink", "*"), "evict": ("tab:olive", "X"),
}


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        r = json.load(f)
    # the moe-kN rows vary the FFN, not the cache (their KV is moe-full's): they are in the
    # table and the JSON, not on the KV axes, where their perplexity would flatten the rest
    cfgs = [c for c in r["configs"] if c.get("ppl") is not None and family(c["name"]) != "moe-k"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, key, label in ((axes[0], "kv_bytes_stored", "KV MiB stored (end of chunk)"),
                           (axes[1], "bytes_read_per_attend", "KiB read per attend")):
        scale = 1048576.0 if key == "kv_bytes_stored" else 1024.0
        seen = set()
        for c in cfgs:
            fam = family(c["name"])
            color, marker = STYLE.get(fam, ("tab:cyan", "o"))
            lab = fam if fam not in seen else None
            seen.add(fam)
            face = color if c["model"] == "dense" else "none"
            ax.scatter(c[key] / scale, c["ppl"], marker=marker, s=60, edgecolors=color,
                       facecolors=face, label=lab)
            ax.annotate(c["name"], (c[key] / scale, c["ppl"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        for c in cfgs:
            if c.get("baseline"):
                ax.axhline(c["ppl"], color="black", lw=0.6, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="filled: dense, open: MoE", title_fontsize=7)
    s = r["settings"]
    axes[0].set_title("perplexity vs KV memory (%d x %d tokens)" % (s["chunks"], s["ctx"]))
    axes[1].set_title("perplexity vs KV bytes read")
    ax = axes[2]
    any_pk = False
    for c in r["configs"]:
        pts = sorted((p["length"], p["accuracy"]) for p in c.get("passkey", []))
        if not pts:
            continue
        any_pk = True
        color, marker = STYLE.get(family(c["name"]), ("tab:cyan", "o"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                label=c["name"], alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title("passkey retrieval (%s prompt; %d samples a length, %d above %d)"
                 % (s.get("passkey_format", "plain"), s.get("passkey_samples", 0),
                    s.get("passkey_long_samples", 0), s.get("passkey_long", 0)), fontsize=10)
    ax.grid(alpha=0.3)
    if any_pk:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no passkey runs", ha="center", transform=ax.transAxes)
    m = r.get("machine", {})
    fig.suptitle("pikv eval %s, %s (%s threads), %s" % (r.get("version", ""), m.get("cpu", "?"),
                                                        m.get("threads", "?"), r.get("date", "")),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
