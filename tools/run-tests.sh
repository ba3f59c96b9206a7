#!/usr/bin/env bash
# Builds PiKV three times and runs the whole test suite on each build:
#   build/       release build, warnings as errors
#   build-clang/ the same with clang
#   build-asan/  AddressSanitizer + UndefinedBehaviorSanitizer (any report fails)
# Usage: tools/run-tests.sh [--no-asan]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
asan=1
[ "${1:-}" = "--no-asan" ] && asan=0

step() { echo; echo "==== $*"; }
# OpenCL program binaries (and PoCL's own kernel cache) are shared by the three builds.
export PIKV_CACHE_DIR="${PIKV_CACHE_DIR:-$PWD/build/opencl-cache}"
mkdir -p "$PIKV_CACHE_DIR"
# The real-model tests (gguf_model) are registered in all three builds when tools/setup-model.sh
# has put the model under ${PIKV_CACHE:-~/.cache/pikv} (CMake looks there at configure time).
model="${PIKV_CACHE:-$HOME/.cache/pikv}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$model" ]; then echo "model: $model"; else echo "model: none at $model (run tools/setup-model.sh): model tests skipped"; fi
command -v clinfo >/dev/null && { echo "OpenCL platforms:"; clinfo -l 2>&1 | sed 's/^/  /'; }
command -v vulkaninfo >/dev/null && { echo "Vulkan devices:"; vulkaninfo --summary 2>/dev/null | grep -E "deviceName|apiVersion" | sed 's/^/  /'; }
# The accelerator backends are auto-detected; said explicitly so a stale cache cannot drop one.
# CUDA (compiled and linked, not run: CI has no GPU) is built in the release and sanitizer
# builds (the latter checks its host code's discovery path under ASan/UBSan); the clang build
# leaves it out to keep CI short.
backends=(-DPIKV_OPENCL=AUTO -DPIKV_VULKAN=AUTO)
# With the toolkit present (CI's machine has it), CUDA and NCCL are required, so a
# broken detection fails the run instead of silently dropping the backend.
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  cuda=(-DPIKV_CUDA=ON -DPIKV_NCCL=ON)
else
  echo "nvcc not found: the CUDA backend is not built (install the CUDA toolkit to build it)"
  cuda=(-DPIKV_CUDA=AUTO -DPIKV_NCCL=AUTO)
fi
no_cuda=(-DPIKV_CUDA=OFF -DPIKV_NCCL=OFF)
# MPI (the MPI communicator, its tests run under mpirun): required when Open MPI (or another
# MPI) is installed, in all three builds.
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  backends+=(-DPIKV_MPI=ON)
else
  echo "mpicc/mpirun not found: the MPI communicator is built only if CMake finds MPI (tools/setup-debian.sh installs Open MPI)"
  backends+=(-DPIKV_MPI=AUTO)
fi

step "release build (build/)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPIKV_WERROR=ON "${backends[@]}" "${cuda[@]}"
cmake --build build -j "$jobs"
step "tests (release)"
ctest --test-dir build -j "$jobs" --output-on-failure

if command -v clang >/dev/null; then
  step "clang build (build-clang/)"
  cmake -S . -B build-clang -G Ninja -DCMAKE_BUILD_TYPE=Release -DPIKV_WERROR=ON -DCMAKE_C_COMPILER=clang "${backends[@]}" "${no_cuda[@]}"
  cmake --build build-clang -j "$jobs"
  step "tests (clang)"
  ctest --test-dir build-clang -j "$jobs" --output-on-failure
else
  echo "clang not found: skipping the clang build (tools/setup-debian.sh installs it)"
fi

if [ "$asan" = 1 ]; then
  step "sanitizer build (build-asan/)"
  # executables linked through the CUDA toolchain get the sanitizer runtime from the linker flags
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DPIKV_WERROR=ON "${backends[@]}" "${cuda[@]}" \
    "-DCMAKE_C_FLAGS=-O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" \
    "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined"
  cmake --build build-asan -j "$jobs"
  step "tests (ASan + UBSan)"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan -j "$jobs" --output-on-failure
fi
echo
echo "all test runs passed"
