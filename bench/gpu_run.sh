#!/usr/bin/env bash
# Build, test and benchmark in the GPU test environment (H100, torch 2.11+cu130, no network), with
# the ExecuTorch/torchao wheels that ../shared/tools/device-wheels put in .whl/
# (ET_WHEELS=.whl-et1.2.0 for the 1.2.0 release: `device-wheels 1.2.0`).
# Usage: [ET_WHEELS=DIR] bench/gpu_run.sh OUT_DIR STEP...
#   steps: build pytest tests sanitizer aoti export cli bench verify
#          runner runner_latency runner_sanitizer runner_ratio
#          eagle_runner eagle_llama_export eagle_llama_time
# The bench step times ExecuTorch's kernels too when ET_INT4_EXECUTORCH_SRC names its checkout.
# The runner steps use the executor_runner that tools/build_executor_runner.sh put in .runner/
# (ET_INT4_RUNNER_DIR), which must come from the release of ET_WHEELS: ET_WHEELS=.whl-et1.4.1 with
# a runner built from v1.4.1. `runner` (the end-to-end test) keeps the tiny EAGLE program in
# out/runner-eagle (git-ignored, so it stays for later calls on the same machine), which
# runner_latency and runner_sanitizer run. `eagle_llama_export` keeps the Llama-shaped EAGLE program
# (EAGLE_LAYERS target layers, default 4) in out/eagle-llama for `eagle_llama_time`.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
wheels=${ET_WHEELS:-.whl}
site=/tmp/site-$(basename "$wheels")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl || exit 1
export PYTHONPATH=$site FLATC_EXECUTABLE=$site/executorch/data/bin/flatc
python3 -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("torch", "executorch", "torchao")))' | tee "$out/versions.txt"
runners=$(realpath "${ET_INT4_RUNNER_DIR:-.runner}")
eagle=$PWD/out/runner-eagle
status=0
run() {  # run STEP COMMAND...: log to $out/STEP.log, print its tail
  local step=$1; shift
  local start=$SECONDS
  "$@" > "$out/$step.log" 2>&1; local rc=$?
  echo "== $step: exit $rc in $((SECONDS - start)) s"; tail -n 25 "$out/$step.log"
  [ $rc -eq 0 ] || status=1
}
# Steps of several commands. A ( ) body runs in a subshell, so `set -e` ends the step, not this script;
# paths stay quoted words (no command string is parsed again).
library() { python3 -c 'import et_int4.runtime as r; print(r.library_path())'; }
runner_latency() (  # the stock runner with the library preloaded; the linked one, plain and with options
  set -e
  local lib files linked
  lib=$(library)
  files=(--pte "$eagle/eagle.pte" --ptd "$eagle/aoti_cuda_blob.ptd" --methods "prefill,target_verify,draft_decode")
  linked=(python3 bench/runner_latency.py --runner "$runners/executor_runner_et_int4" "${files[@]}")
  python3 bench/runner_latency.py --runner "$runners/executor_runner" --preload "$lib" "${files[@]}" \
    --label 'executor_runner + LD_PRELOAD'
  "${linked[@]}" --label 'linked' | tail -n +3
  "${linked[@]}" --label 'linked, shared stream' -- --shared_cuda_stream | tail -n +3
  "${linked[@]}" --label 'linked, CUDA graph' -- --cuda_graph_methods=prefill,target_verify,draft_decode | tail -n +3
)
runner_sanitizer() (  # memcheck over each method of the kept program, library preloaded
  set -e
  local lib ldpath m
  lib=$(library)
  ldpath=$(python3 -c 'from et_int4.runtime.runner import runner_env; print(runner_env().get("LD_LIBRARY_PATH", ""))')
  for m in prefill target_verify draft_decode; do
    echo "== $m"
    LD_LIBRARY_PATH=$ldpath compute-sanitizer --error-exitcode=9 env LD_PRELOAD="$lib" \
      "$runners/executor_runner" --model_path="$eagle/eagle.pte" --data_path="$eagle/aoti_cuda_blob.ptd" \
      --method_name="$m" --print_output=none
  done
)
runner_ratio() (  # verify (8 tokens) against decode (1 token), 2 layers of Llama 3 8B shapes + lm_head
  set -e
  local linked
  linked=(python3 bench/runner_latency.py --runner "$runners/executor_runner_et_int4" --pte out/runner-llama/verify_decode.pte
          --ptd out/runner-llama/aoti_cuda_blob.ptd --methods "decode,verify" --ratio verify/decode)
  python3 bench/bench_eagle_verify.py --layers 2 --pte out/runner-llama
  "${linked[@]}" --label linked
  "${linked[@]}" --label 'linked, CUDA graph' -- --cuda_graph_methods=decode,verify
)
eagle_llama_time() {  # per-call times and the speedup table, into $out/eagle_llama.md
  python3 bench/bench_eagle_runner.py time --runner "$runners/eagle_runner" --dir out/eagle-llama | tee "$out/eagle_llama.md"
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
    runner) run runner env ET_INT4_EXECUTOR_RUNNER="$runners/executor_runner" ET_INT4_RUNNER_WORKDIR="$eagle" \
      python3 -m pytest -m cuda -v -p no:cacheprovider tests/test_runner_e2e.py ;;
    runner_latency) run runner_latency runner_latency ;;
    runner_sanitizer) run runner_sanitizer runner_sanitizer ;;
    runner_ratio) run runner_ratio runner_ratio ;;
    eagle_runner)  # the EAGLE loop on the tiny program: speculative == greedy tokens
      run eagle_runner env ET_INT4_EAGLE_RUNNER="$runners/eagle_runner" ET_INT4_EAGLE_WORKDIR="$PWD/out/eagle-tiny" \
        python3 -m pytest -m cuda -v -p no:cacheprovider tests/test_eagle_runner.py ;;
    eagle_llama_export)
      run eagle_llama_export python3 bench/bench_eagle_runner.py export --layers "${EAGLE_LAYERS:-4}" --dir out/eagle-llama ;;
    eagle_llama_time) run eagle_llama_time eagle_llama_time ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
