#!/bin/sh
# ctest eval_quick: `pikv eval --quick --check` on the real model (docs/eval.md), then the
# first chunk's f32 perplexity against the float64 numpy reference of
# tools/llama_reference.py --nll over the same token ids (1e-3 relative).
#
# usage: eval_quick.sh PIKV MODEL PYTHON SOURCE_DIR WORK_DIR [BACKEND [CONFIGS]]
# BACKEND (default cpu) runs the attention on that PiKV backend; CONFIGS limits the lossy rows
# (the exact rows and baselines always run under --check).
# The corpus is `pikv eval`'s default ($PIKV_CACHE/corpus/kjv-heldout.txt, made by
# tools/setup-model.sh); without it, one is made here from the bible-kjv package if
# present, else the test is skipped (exit 77).
set -eu
pikv=$1 model=$2 py=$3 src=$4 work=$5 backend=${6:-cpu} configs=${7:-}
mkdir -p "$work"
ids=$work/eval-quick-$backend.ids
json=$work/eval-quick-$backend.json
rm -f "$ids" "$json"

corpus=${PIKV_CACHE:-$HOME/.cache/pikv}/corpus/kjv-heldout.txt
if [ ! -f "$corpus" ]; then
    if command -v bible >/dev/null 2>&1; then
        corpus=$work/kjv-heldout.txt
        bible -f "Joh1:1-21:25" | sed 's/^[^ ]* //' > "$corpus"
        echo "eval_quick: no held-out corpus in the cache; using $corpus (bible-kjv)"
    else
        echo "eval_quick: SKIPPED: no corpus at $corpus (run tools/setup-model.sh)"
        exit 77
    fi
fi

"$pikv" eval --quick --check --quiet --model "$model" --corpus "$corpus" \
    --backend "$backend" ${configs:+--configs "$configs"} --dump-ids "$ids" --json "$json"

if ! grep -q -- '--nll' "$src/tools/llama_reference.py"; then
    echo "eval_quick: SKIPPED the reference comparison: tools/llama_reference.py has no --nll mode"
    exit 77
fi
ref=$("$py" "$src/tools/llama_reference.py" "$model" --nll "$ids")
echo "reference: $ref"
"$py" - "$json" "$ref" <<'PY'
import json, math, sys
r = json.load(open(sys.argv[1]))
fc = r["first_chunk"]
f = sys.argv[2].split()
ref = dict(zip(f[0::2], f[1::2]))
ref_nll, ref_n = float(ref["nll_sum"]), int(ref["count"])
ref_ppl = math.exp(ref_nll / ref_n)
rel = abs(fc["ppl"] - ref_ppl) / ref_ppl
print("pikv %s: nll_sum %.8f count %d ppl %.8f; reference ppl %.8f; relative %.3g"
      % (fc["config"], fc["nll_sum"], fc["count"], fc["ppl"], ref_ppl, rel))
if ref_n != fc["count"]:
    sys.exit("FAIL: %d reference tokens vs %d" % (ref_n, fc["count"]))
if not rel <= 1e-3:
    sys.exit("FAIL: perplexity differs from the reference by %.3g relative (bound 1e-3)" % rel)
print("PASS")
PY
