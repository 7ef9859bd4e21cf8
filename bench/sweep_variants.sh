#!/usr/bin/env bash
# Rebuild the GEMM with other pipeline constants and time each build (GPU machine; after
# `bench/gpu_run.sh OUT build`). Each variant is "WARPS STAGES TILES_PER_WARP CTAS_PER_SM [SOURCE]",
# SOURCE another version of backends/cuda/int4/int4_mm.cu to compare against.
# Usage: bench/sweep_variants.sh OUT_DIR "8 2 1 3" "8 2 2 2" ...
set -uo pipefail
out=$1; shift
torch_include=$(python3 -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('torch').submodule_search_locations[0], 'include'))")
for variant in "$@"; do
  read -r warps stages tiles ctas source <<< "$variant"
  source=${source:-backends/cuda/int4/int4_mm.cu}
  dir=/tmp/variant_${warps}_${stages}_${tiles}_${ctas}_$(basename "$source" .cu)
  mkdir -p "$dir/backends/cuda/int4"
  cp backends/cuda/int4/int4_mm.h "$dir/backends/cuda/int4/"
  sed -e "s/^constexpr int kWarps = [0-9]*;/constexpr int kWarps = $warps;/" \
      -e "s/^constexpr int kStages = [0-9]*;/constexpr int kStages = $stages;/" \
      -e "s/^constexpr int kTilesPerWarp = [0-9]*;/constexpr int kTilesPerWarp = $tiles;/" \
      -e "s/^constexpr int kCtasPerSm = [0-9]*;/constexpr int kCtasPerSm = $ctas;/" \
      "$source" > "$dir/backends/cuda/int4/int4_mm.cu"
  nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -arch=sm_90 -cudart static -Xlinker --allow-shlib-undefined \
    -DET_INT4_SHIM_GEMM_MAX_M=8 -DET_INT4_WITH_CUDA=1 -I"$dir" -I. -I"$torch_include" \
    "$dir/backends/cuda/int4/int4_mm.cu" runtime/et_int4_shim.cpp runtime/cpu_reference.cpp \
    -o "$dir/libet_int4.so" || { echo "variant $variant: build failed"; continue; }
  echo "## variant warps=$warps stages=$stages tiles=$tiles ctas_per_sm=$ctas source=$source"
  ET_INT4_LIBRARY="$dir/libet_int4.so" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
    -k "test_matches_reference_for_every_m and (4096-5376 or 7-4096 or 14336-256)" 2>&1 | tail -n 1
  ET_INT4_LIBRARY="$dir/libet_int4.so" python3 bench/bench_int4_mm.py --no-baselines --m 1 8 \
    --group-sizes 32 --shapes 4096x4096 4096x14336 5376x21504 21504x5376 2>&1 | grep -v "^| K x N\|^| ---"
done
