"""Per-method latency under ExecuTorch's executor_runner: its `--num_executions` runs, each timed by
the runner around `Method::execute()` (host-to-device copy of the inputs, the delegate, the copy
back, synchronized), as the runner logs them ("Iteration i of n: t ms").

    python bench/runner_latency.py --runner .runner/executor_runner --preload LIB \\
        --pte out/eagle.pte --ptd out/aoti_cuda_blob.ptd --methods prefill,target_verify,draft_decode

Inputs are the runner's own (every element 1; dynamic dimensions at their maximum). Extra runner
flags (e.g. `--cuda_graph_methods=target_verify` of the project's linked runner) go after `--`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

from et_int4.runtime.runner import runner_command, runner_env

# Runs left out of the statistics: the first runs load kernels and allocate, and a CUDA-graph
# method warms up 3 times and is captured on the 4th.
WARMUP_RUNS = 5
ITERATION = re.compile(r"Iteration (\d+) of \d+: ([0-9.]+) ms")
GRAPH_CAPTURED = "CUDA graph: captured and instantiated"  # the CUDA backend's log line


def time_method(args, method: str) -> tuple[list[float], bool]:
    """The runs' times after the warm-up, and whether the backend ran the method as a CUDA graph."""
    command = runner_command(
        args.runner, [f"--model_path={args.pte}", f"--data_path={args.ptd}", f"--method_name={method}",
                      f"--num_executions={args.num_executions}", "--print_output=none",
                      *args.runner_flags],
        preload=args.preload)
    result = subprocess.run(command, env=runner_env(), capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit code {result.returncode}:\n{log[-4000:]}")
    times = [float(ms) for _, ms in ITERATION.findall(log)]
    if len(times) != args.num_executions:
        sys.exit(f"expected {args.num_executions} 'Iteration' lines from the runner, found "
                 f"{len(times)}: is it built with EXECUTORCH_ENABLE_LOGGING=ON?\n{log[-4000:]}")
    return times[WARMUP_RUNS:], GRAPH_CAPTURED in log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", type=Path, required=True)
    parser.add_argument("--preload", type=Path, help="library to LD_PRELOAD (libet_int4.so)")
    parser.add_argument("--pte", type=Path, required=True)
    parser.add_argument("--ptd", type=Path, required=True)
    parser.add_argument("--methods", required=True, help="comma-separated")
    parser.add_argument("--num-executions", type=int, default=100)
    parser.add_argument("--label", default="", help="first column of the table rows")
    parser.add_argument("--ratio", help="NUM/DEN: print the ratio of two methods' medians")
    parser.add_argument("runner_flags", nargs="*", help="after --: passed to the runner")
    args = parser.parse_args(argv)
    if args.num_executions <= WARMUP_RUNS:
        parser.error(f"--num-executions must exceed the {WARMUP_RUNS} warm-up runs")
    label = args.label or args.runner.name
    medians = {}
    print("| runner | method | median ms | min ms | max ms | runs | CUDA graph |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods.split(","):
        times, graph = time_method(args, method)
        medians[method] = statistics.median(times)
        print(f"| {label} | {method} | {medians[method]:.3f} | {min(times):.3f} | {max(times):.3f} "
              f"| {len(times)} | {'yes' if graph else 'no'} |", flush=True)
    if args.ratio:
        num, den = args.ratio.split("/")
        print(f"\n{label}: {num} / {den} = {medians[num] / medians[den]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
