#!/usr/bin/env bash
# Build the kernels as variants and time each build (GPU machine; after `bench/gpu_run.sh OUT build`).
# A variant is a quoted list of words: ET_INT4_*=VALUE words are compile definitions of
# backends/cuda/int4/int4_mm.cu (its tuning knobs), and src=FILE builds FILE in that source's place
# (e.g. a saved copy of an earlier revision's int4_mm.cu, to time a change against it); "" is the
# tree as it is. E.g. "ET_INT4_STAGE_BLOCKS=8 ET_INT4_PREFETCH=0", "src=/tmp/int4_mm_base.cu".
# Usage: bench/sweep_variants.sh OUT_DIR VARIANT... (set SWEEP_SHAPES / SWEEP_M / SWEEP_GS /
# SWEEP_ZEROS to change what runs, SWEEP_ROUNDS=N to time the builds N times in alternation, so that
# a drift of the card shows as spread rather than as a difference between builds). Save what it prints
# and `python3 bench/sweep_table.py FILE` makes the range table that bench/RESULTS.md records.
set -uo pipefail
out=$1; shift
shapes=${SWEEP_SHAPES:-4096x4096 4096x14336 14336x4096 5376x21504 21504x5376}
name_of() { echo "${1:-default}" | tr ' =/.' '_-__'; }
# Build every variant at once, each with the project's own build (CMakeLists.txt: SHIM_GEMM_MAX_M, the
# other options and -warn-spills, whose report is counted below) plus its definitions for the CUDA
# sources, in a fresh folder so that no cached definitions carry over; then time them one by one.
for variant in "$@"; do
  name=$(name_of "$variant")
  dir=/tmp/variant_$name
  source_dir=.
  defines=""
  for word in $variant; do
    case $word in
      src=*)
        source_dir=/tmp/variant_src_$name
        rm -rf "$source_dir" && mkdir -p "$source_dir" && cp -r CMakeLists.txt backends runtime "$source_dir"/ &&
          cp "${word#src=}" "$source_dir/backends/cuda/int4/int4_mm.cu" ||
          { echo "no kernel source ${word#src=}" > "$out/build_$name.log"; continue 2; } ;;
      *) defines+="-D$word " ;;
    esac
  done
  rm -rf "$dir"
  { cmake -S "$source_dir" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DCMAKE_CUDA_FLAGS="$defines" && cmake --build "$dir" -j 4; } \
    > "$out/build_$name.log" 2>&1 &
done
wait
for round in $(seq "${SWEEP_ROUNDS:-1}"); do
  for variant in "$@"; do
    name=$(name_of "$variant")
    dir=/tmp/variant_$name
    [ -f "$dir/libet_int4.so" ] || { echo "variant '$variant': build failed"; cat "$out/build_$name.log"; continue; }
    echo "## variant '${variant:-default}' (round $round)"
    if [ "$round" = 1 ]; then
      grep -h "spill" "$out/build_$name.log" | sort | uniq -c | head -n 3
      ET_INT4_LIBRARY="$dir/libet_int4.so" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
        -k "test_matches_reference_for_every_m and (4096-5376 or 96-4096 or 14336-256)" 2>&1 | tail -n 1
    fi
    # shellcheck disable=SC2086
    ET_INT4_LIBRARY="$dir/libet_int4.so" python3 bench/bench_int4_mm.py --no-baselines --m ${SWEEP_M:-1 8} \
      --group-sizes ${SWEEP_GS:-32} --zero-points ${SWEEP_ZEROS:-group row} --shapes $shapes 2>&1 |
      grep -v "^| K x N\|^| ---\|skipped"
  done
done
