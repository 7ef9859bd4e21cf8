#!/usr/bin/env bash
# Build the kernels with other tuning knobs (compile definitions of backends/cuda/int4/int4_mm.cu,
# ET_INT4_*) and time each build (GPU machine; after `bench/gpu_run.sh OUT build`). Each variant is
# a quoted list of definitions, e.g. "ET_INT4_STAGE_BLOCKS=8 ET_INT4_PREFETCH=0"; "" is the default.
# Usage: bench/sweep_variants.sh OUT_DIR VARIANT... (set SWEEP_SHAPES / SWEEP_M to change what runs)
set -uo pipefail
out=$1; shift
torch_include=$(python3 -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('torch').submodule_search_locations[0], 'include'))")
shapes=${SWEEP_SHAPES:-4096x4096 4096x14336 14336x4096 5376x21504 21504x5376}
name_of() { echo "${1:-default}" | tr ' =' '_-'; }
# Build every variant at once (one nvcc each, the machine has the cores), then time them one by one.
for variant in "$@"; do
  dir=/tmp/variant_$(name_of "$variant")
  mkdir -p "$dir"
  defines=$(for d in $variant; do printf -- '-D%s ' "$d"; done)
  # shellcheck disable=SC2086
  nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -arch=sm_90 -cudart static -Xlinker --allow-shlib-undefined \
    -Xptxas -warn-spills -DET_INT4_SHIM_GEMM_MAX_M=8 -DET_INT4_WITH_CUDA=1 $defines -I. -I"$torch_include" \
    backends/cuda/int4/int4_mm.cu runtime/et_int4_shim.cpp runtime/cpu_reference.cpp \
    -o "$dir/libet_int4.so" > "$out/build_$(name_of "$variant").log" 2>&1 &
done
wait
for variant in "$@"; do
  name=$(name_of "$variant")
  dir=/tmp/variant_$name
  [ -f "$dir/libet_int4.so" ] || { echo "variant '$variant': build failed"; cat "$out/build_$name.log"; continue; }
  echo "## variant '${variant:-default}'"
  grep -h "spill" "$out/build_$name.log" | sort | uniq -c | head -n 3
  ET_INT4_LIBRARY="$dir/libet_int4.so" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
    -k "test_matches_reference_for_every_m and (4096-5376 or 96-4096 or 14336-256)" 2>&1 | tail -n 1
  # shellcheck disable=SC2086
  ET_INT4_LIBRARY="$dir/libet_int4.so" python3 bench/bench_int4_mm.py --no-baselines --m ${SWEEP_M:-1 8} \
    --group-sizes ${SWEEP_GS:-32} --shapes $shapes 2>&1 | grep -v "^| K x N\|^| ---\|skipped"
done
