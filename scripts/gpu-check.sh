#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds PiKV with CUDA (and NCCL when found),
# runs the backend conformance program on CUDA (and on any other GPU backend
# the machine has), runs `pikv run` end to end on CUDA, and the dense decode
# attention benchmark at 4K/32K/128K tokens against the GPU's measured read
# bandwidth, then `pikv bench` on every backend (JSON and plots next to the build
# directory). Prints a summary; exits non-zero when a check fails.
#
#   scripts/gpu-check.sh [build-dir]        (default build-gpu)
# Environment: CUDA_ARCHS (default: the GPU's own, e.g. 90), JOBS.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-gpu}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 4)}
export PATH="$PATH:/usr/local/cuda/bin"
summary=()
fail=0
note() { summary+=("$1"); echo "== $1"; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
arch=${CUDA_ARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')}
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DPIKV_CUDA=ON -DPIKV_NCCL=AUTO \
  ${arch:+-DPIKV_CUDA_ARCHITECTURES="${arch}-real"} >"$build.configure.log" 2>&1 \
  || { tail -30 "$build.configure.log"; echo "configure failed"; exit 1; }
cmake --build "$build" -j "$jobs" >"$build.build.log" 2>&1 || { tail -40 "$build.build.log"; echo "build failed"; exit 1; }
note "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%MZ)"
"$build/bin/pikv" devices --backend all

# conformance: every op on CUDA against the CPU reference (-r: a CUDA device must be there)
if "$build/bin/backend_ops" -b cuda -r >"$build.backend_ops_cuda.log" 2>&1; then
  note "backend_ops -b cuda: $(tail -1 "$build.backend_ops_cuda.log")"
else
  fail=1; grep -E "FAIL|failed" "$build.backend_ops_cuda.log" | head -20
  note "backend_ops -b cuda FAILED: $(tail -1 "$build.backend_ops_cuda.log")"
fi
for b in vulkan opencl; do # the same on NVIDIA's Vulkan / OpenCL drivers when installed
  if "$build/bin/pikv" devices --backend "$b" 2>/dev/null | grep -q "${b}0"; then
    if "$build/bin/backend_ops" -b "$b" -r >"$build.backend_ops_$b.log" 2>&1; then
      note "backend_ops -b $b: $(tail -1 "$build.backend_ops_$b.log")"
    else
      fail=1; note "backend_ops -b $b FAILED: $(tail -1 "$build.backend_ops_$b.log")"
    fi
  fi
done
# the library's own tests (CPU and whatever else the machine has)
if ctest --test-dir "$build" -j "$jobs" >"$build.ctest.log" 2>&1; then
  note "ctest: $(grep -E 'tests passed' "$build.ctest.log")"
else
  fail=1; note "ctest FAILED: $(grep -E 'tests passed|FAILED|Failed' "$build.ctest.log" | head -5 | tr '\n' ' ')"
fi
# end to end: exact runs must meet the f64 reference's bound (exit status)
for dt in f32 f16 int8 int4; do
  if out=$("$build/bin/pikv" run --backend cuda --devices 1 --dtype "$dt" --context 8192 --steps 4 --layers 2 2>&1); then
    note "pikv run --backend cuda --dtype $dt: $(echo "$out" | grep -E 'PASS|LOSSY|error' | head -2 | tr '\n' ' ')"
  else
    fail=1; echo "$out" | tail -20; note "pikv run --backend cuda --dtype $dt FAILED"
  fi
done
# roofline: achieved KV bytes/s over the measured read bandwidth
for dt in f16 int8 int4; do
  "$build/bin/pikv_bench_cuda_attention" --dtype "$dt" --contexts 4096,32768,131072 | tee "$build.bench_$dt.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { fail=1; note "bench $dt FAILED (exit $rc)"; continue; }
  note "bench $dt: $(grep -E 'measured read bandwidth' "$build.bench_$dt.log")"
  while read -r line; do note "  $line"; done < <(grep -E '^ +[0-9]+ ' "$build.bench_$dt.log")
  [ "$dt" = f16 ] && note "$(tail -1 "$build.bench_$dt.log")"
done
# pikv bench on every backend the machine has (docs/performance.md): tables, JSON, plots
if "$build/bin/pikv" bench --backend all --json "$build.bench.json" >"$build.bench.txt" 2>"$build.bench.err"; then
  note "pikv bench: $build.bench.txt, $build.bench.json"
  while read -r line; do note "  $line"; done < <(sed -n '/^Targets/,$p' "$build.bench.txt")
  python3 bench/bench_plot.py "$build.bench.json" --out "$build-plots" || note "(no plots: matplotlib missing)"
else
  fail=1; note "pikv bench FAILED: $(tail -3 "$build.bench.err" | tr '\n' ' ')"
fi
echo
echo "==== summary"
printf '%s\n' "${summary[@]}"
exit $fail
