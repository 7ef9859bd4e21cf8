"""Where one call's time goes in a chain of calls: when each kernel starts and ends, from CUPTI.

A CUDA graph calls et_int4_plain_mm once per copy of the weights (bench_int4_mm.py's call_graph) and is
replayed under torch.profiler. Each call's two kernels are timed from the end of the GEMM ahead of it,
the kernel its quantizer waits for (bench/RESULTS.md, eighth round of issue 8):

    python bench/chain_timeline.py K N GROUP_SIZE M [group|row] [--copies 24]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import et_int4
import torch
from bench_int4_mm import call_graph  # bench/, the script's folder
from profile_one import random_weights


def kernel_spans(graph: torch.cuda.CUDAGraph, replays: int) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the op's kernels that the replays ran, in start order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    # The Chrome trace keeps CUPTI's sub-microsecond timestamps.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    spans = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("cat") == "kernel" and ("w4a8_gemm" in e["name"] or "quantize" in e["name"])]
    return sorted(spans, key=lambda s: s[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("k", type=int)
    parser.add_argument("n", type=int)
    parser.add_argument("group_size", type=int)
    parser.add_argument("m", type=int)
    parser.add_argument("zeros", nargs="?", choices=("group", "row"), default="row")
    parser.add_argument("--copies", type=int, default=24, help="calls per graph, one per weight copy")
    args = parser.parse_args()

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.m, args.k, device="cuda", generator=gen).bfloat16()
    weights = [random_weights(args.k, args.n, args.group_size, args.zeros == "row", gen) for _ in range(args.copies)]
    op = torch.ops.et_int4.et_int4_plain_mm
    graph = call_graph([lambda w=w: op(x, *w, args.group_size, et_int4.SHIM_GEMM_MAX_M) for w in weights])
    for _ in range(20):
        graph.replay()
    spans = kernel_spans(graph, replays=3)

    quantizers = [s for s in spans if "quantize" in s[0]]
    gemms = [s for s in spans if "w4a8_gemm" in s[0]]
    if len(quantizers) != len(gemms) or len(gemms) < 2:
        raise SystemExit(f"expected pairs of kernels, got {len(quantizers)} quantizers and {len(gemms)} GEMMs")
    columns = {"period": [], "quantizer ends": [], "GEMM's first CTA starts": [], "GEMM ends after the quantizer": []}
    for (_, _, q_end), (_, g_start, g_end), (_, _, ahead_end) in zip(quantizers[1:], gemms[1:], gemms[:-1]):
        columns["period"].append(g_end - ahead_end)
        columns["quantizer ends"].append(q_end - ahead_end)
        columns["GEMM's first CTA starts"].append(g_start - ahead_end)
        columns["GEMM ends after the quantizer"].append(g_end - q_end)
    print(f"{torch.cuda.get_device_name()}, {args.k} x {args.n}, gs {args.group_size}, M = {args.m}, "
          f"{args.zeros} zeros: medians over {len(gemms) - 1} calls, us from the end of the GEMM ahead")
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    print("| " + " | ".join(f"{statistics.median(v):{'.2f' if name == 'period' else '+.2f'}}"
                            for name, v in columns.items()) + " |")


if __name__ == "__main__":
    main()
