#!/bin/sh
# ctest bench_quick: `pikv bench --quick` (docs/performance.md) runs every section on the given
# backends, prints the acceptance ratios last, and writes a JSON document whose figures hang
# together: every device has its roofline, every dense point's share of the read bandwidth and
# every speedup is paired (medians of what each round timed back to back), the dense points read fewer bytes for int8 than f16
# and fewer for int4 than int8, quest and expert selection read fewer bytes than dense, the
# memory section covers three placements with an imbalance >= 1; then the plots are drawn
# when matplotlib is there. Timings are not checked (benchmarks are not timed tests).
#
# usage: bench_quick.sh PIKV WORK_DIR SOURCE_DIR [BACKENDS [PLOT_PYTHON]]
set -eu
pikv=$1 work=$2 src=$3 backends=${4:-cpu} plot_py=${5:-}
mkdir -p "$work"
json=$work/bench-quick-$(echo "$backends" | tr ',' '-').json
out=$work/bench-quick.txt
rm -f "$json" "$out"
"$pikv" bench --quick --backend "$backends" --json "$json" > "$out" || { cat "$out"; echo "bench_quick: pikv bench failed"; exit 1; }
cat "$out"
# the targets block comes last
last=$(grep -n '^Targets' "$out" | cut -d: -f1)
total=$(wc -l < "$out")
[ -n "$last" ] && [ $((total - last)) -le 12 ] || { echo "bench_quick: the targets are not printed last"; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "bench_quick: no python3: JSON not checked"; exit 0; }
python3 - "$json" <<'PY'
import json, math, sys
d = json.load(open(sys.argv[1]))
bad = []
def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)
def need(c, what):
    if not c: bad.append(what)
devs = [x["name"] for x in d["devices"]]
need("cpu0" in devs, "cpu0 measured")
for x in d["devices"]:
    need(x["read_bytes_per_s"] is not None and x["read_bytes_per_s"] > 1e8 or x["read_error"],
         "%s: a roofline or the reason for none" % x["name"])
pts = d["points"]
def find(dev, kind, dtype, batch, ctx, param=0):
    for p in pts:
        if (p["device"], p["kind"], p["dtype"], p["batch"], p["context"], p["param"]) == (dev, kind, dtype, batch, ctx, param):
            return p
for dev in devs:
    dense = [p for p in pts if p["device"] == dev and p["kind"] == "dense"]
    need(dense, "%s: dense points" % dev)
    has_probe = any(x["name"] == dev and x["read_bytes_per_s"] is not None for x in d["devices"])
    for p in dense:
        need(p["seconds"] > 0 and p["bytes"] > 0, "%s: dense %s time and bytes" % (dev, p["dtype"]))
        # the share is the median of each round's attend rate over the probe pass timed
        # just before it (bench_cold_pass): paired, and between the rates' extremes
        if has_probe:
            need(finite(p["probe_bytes_per_s"]) and p["probe_bytes_per_s"] > 1e8 and finite(p["paired_share"]) and
                 p["share_of_read"] == p["paired_share"] and 0 < p["share_of_read"] < 10,
                 "%s: dense %s share of its probe" % (dev, p["dtype"]))
        if p["dtype"] != "f16":
            need(finite(p["paired_speedup"]) and p["speedup"] == p["paired_speedup"],
                 "%s: dense %s speedup paired with f16" % (dev, p["dtype"]))
        if p["dtype"] == "f16":
            i8 = find(dev, "dense", "int8", p["batch"], p["context"])
            i4 = find(dev, "dense", "int4", p["batch"], p["context"])
            need(i8 and i4 and i4["bytes"] < i8["bytes"] < p["bytes"], "%s: bytes f16 > int8 > int4 at %d" % (dev, p["context"]))
            need(i4 and finite(i4["ideal_speedup"]) and abs(i4["ideal_speedup"] - p["bytes"] / i4["bytes"]) < 1e-6 * i4["ideal_speedup"],
                 "%s: int4 ideal" % dev)
    for kind, ref in (("quest", "dense"), ("experts", "experts-dense")):
        sp = [p for p in pts if p["device"] == dev and p["kind"] == kind]
        need(sp, "%s: %s points" % (dev, kind))
        for p in sp:
            r = find(dev, ref, p["dtype"], p["batch"], p["context"])
            need(r and p["bytes"] < r["bytes"], "%s: %s reads fewer bytes than dense" % (dev, kind))
            need(finite(p["speedup"]) and finite(p["ideal_speedup"]) and p["ideal_speedup"] > 1,
                 "%s: %s speedup and ideal" % (dev, kind))
            need(p["speedup"] == p["paired_speedup"], "%s: %s speedup paired with dense" % (dev, kind))
need(any(b["name"] == "c-contiguous-f32" and b["seconds"] > 0 for b in d["baselines"]), "the C baseline")
need(sorted(m["placement"] for m in d["memory"]) == ["balanced", "expert", "hash"], "three placements")
for m in d["memory"]:
    need(m["imbalance"] >= 1 and len(m["bytes_used"]) == m["n_devices"] >= 2, "memory of %s" % m["placement"])
need(len(d["targets"]) == 4, "four targets")
if bad:
    print("bench_quick: JSON check failed: " + "; ".join(bad))
    sys.exit(1)
print("bench_quick: JSON ok (%d points, %d devices)" % (len(pts), len(devs)))
PY
if [ -n "$plot_py" ] && "$plot_py" -c "import matplotlib" 2>/dev/null; then
    "$plot_py" "$src/bench/bench_plot.py" "$json" --out "$work/plots"
    for f in roofline speedup memory; do
        [ -s "$work/plots/bench-$f.png" ] || { echo "bench_quick: no bench-$f.png"; exit 1; }
    done
fi
