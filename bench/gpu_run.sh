#!/usr/bin/env bash
# Build, test and benchmark in the GPU test environment (H100, torch 2.11+cu130, no network), with
# the ExecuTorch/torchao wheels that ../shared/tools/device-wheels put in .whl/
# (ET_WHEELS=.whl-et1.2.0 for the 1.2.0 release: `device-wheels 1.2.0`).
# Usage: [ET_WHEELS=DIR] bench/gpu_run.sh OUT_DIR STEP...
#   steps: build pytest tests sanitizer aoti export cli bench verify
# The bench step times ExecuTorch's kernels too when ET_INT4_EXECUTORCH_SRC names its checkout.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
wheels=${ET_WHEELS:-.whl}
site=/tmp/site-$(basename "$wheels")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl || exit 1
export PYTHONPATH=$site FLATC_EXECUTABLE=$site/executorch/data/bin/flatc
python3 -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("torch", "executorch", "torchao")))' | tee "$out/versions.txt"
status=0
run() {  # run STEP COMMAND...: log to $out/STEP.log, print its tail
  local step=$1; shift
  local start=$SECONDS
  "$@" > "$out/$step.log" 2>&1; local rc=$?
  echo "== $step: exit $rc in $((SECONDS - start)) s"; tail -n 25 "$out/$step.log"
  [ $rc -eq 0 ] || status=1
}
for step in "$@"; do
  case $step in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"; cat "$out/gpu.txt"
      run build env CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
        python3 -m pip install -v --no-index --no-deps --no-build-isolation -e . ;;
    pytest) run pytest python3 -m pytest -q -p no:cacheprovider ;;  # the whole suite, as README says
    tests) run tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py -k "not sanitizer" ;;
    sanitizer) run sanitizer python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py -k sanitizer ;;
    aoti) run aoti python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_aoti.py ;;
    export) run export python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_export_eagle.py ;;
    cli)  # README's export command, default output folder
      run cli python3 export/export_eagle.py --matvec-max-m 8
      ls -l out/ | tee -a "$out/cli.log" ;;
    bench) run bench python3 bench/bench_int4_mm.py --out "$out/bench.md" ;;
    verify) run verify python3 bench/bench_eagle_verify.py ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
