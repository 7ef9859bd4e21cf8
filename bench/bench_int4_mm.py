"""Time et_int4_plain_mm as the runtime calls it (activation quantization included) on a GPU.

Baselines: the M = 1 op launched once per row (the per-row matvec design this replaces, which
reads the weights M times), PyTorch's tinygemm `_weight_int4pack_mm`, bf16 `F.linear`, and the
floor (bytes moved / measured device-to-device copy bandwidth).

Method: each variant runs inside one CUDA graph that calls it once per copy of the weights, the
copies together larger than L2 so that every call streams its weights from HBM; graph replays are
timed with CUDA events and the median per call is reported.

    python bench/bench_int4_mm.py [--shapes 4096x14336 ...] [--group-sizes 32 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics

import torch
import torch.nn.functional as F

import et_int4

SHAPES = ["4096x4096", "4096x14336", "14336x4096", "5376x21504", "21504x5376"]  # K x N
ROTATION_BYTES = 256 << 20  # several times the H100's 50 MB L2
REPLAYS = 40


def median_us(fn, replays: int = REPLAYS) -> float:
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * src.element_size() / (median_us(lambda: dst.copy_(src)) * 1e-6)


def per_call_us(calls: list) -> float:
    """Median time of one call, from a graph replaying one call per weight copy."""
    for call in calls:  # warm-up: allocations and lazy initialization stay out of the graph
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return median_us(graph.replay) / len(calls)


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(ROTATION_BYTES / nbytes))


def bench_shape(k: int, n: int, group_size: int, ms: list[int], max_m: int, bandwidth: float,
                baselines: bool) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(k * n + group_size)
    groups = k // group_size
    int4_bytes = n * k // 2 + n * groups * 3
    weights = [
        (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen),
         (torch.rand(n, groups, device="cuda", generator=gen) * 0.02).to(torch.bfloat16),
         torch.randint(0, 16, (n, groups), dtype=torch.int8, device="cuda", generator=gen))
        for _ in range(copies_for(int4_bytes))
    ]
    if baselines:
        # tinygemm: its own packed layout of the same nibbles; bf16 scales-and-zeros [K/gs, N, 2].
        tiny = [(torch._convert_weight_to_int4pack(q, 8),
                 torch.stack([s.t().float(), torch.randn_like(s.t().float())], dim=-1).bfloat16().contiguous())
                for q, s, _ in weights]
        dense = [torch.randn(n, k, device="cuda", generator=gen).bfloat16()
                 for _ in range(copies_for(n * k * 2))]
    op = torch.ops.et_int4.et_int4_plain_mm

    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
        floor_us = (int4_bytes + m * k * 2 + m * n * 2) / bandwidth * 1e6
        row = dict(k=k, n=n, group_size=group_size, m=m, floor=floor_us,
                   ours=per_call_us([lambda w=w: op(x, *w, group_size, max_m) for w in weights]))
        row["pct_bw"] = 100 * floor_us / row["ours"]
        if baselines:
            row["per_row"] = per_call_us([lambda w=w: [op(x[i:i + 1], *w, group_size, max_m) for i in range(m)]
                                          for w in weights])
            row["tinygemm"] = per_call_us([lambda t=t: torch._weight_int4pack_mm(x, t[0], group_size, t[1])
                                           for t in tiny])
            row["bf16"] = per_call_us([lambda w=w: F.linear(x, w) for w in dense])
        rows.append(row)
    for row in rows:
        row["vs_m1"] = row["ours"] / rows[0]["ours"]  # rows[0] is the smallest M asked for
    return rows


COLUMNS = [("K x N", "{k} x {n}"), ("gs", "{group_size}"), ("M", "{m}"), ("et_int4 us", "{ours:.2f}"),
           ("% copy bw", "{pct_bw:.0f}%"), ("/ M=1", "{vs_m1:.2f}"), ("per-row us", "{per_row:.2f}"),
           ("tinygemm us", "{tinygemm:.2f}"), ("bf16 us", "{bf16:.2f}"), ("floor us", "{floor:.2f}")]


def markdown(rows: list[dict]) -> str:
    columns = [(name, fmt) for name, fmt in COLUMNS if all(fmt[1:].split("}")[0].split(":")[0] in r for r in rows)]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt.format(**r) for _, fmt in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="K x N, e.g. 4096x14336")
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--max-m", type=int, default=et_int4.SHIM_GEMM_MAX_M)
    parser.add_argument("--m", type=int, nargs="+", help="row counts (default 1..max-m)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="time et_int4 only (for sweeps)")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    bandwidth = copy_bandwidth()
    header = (f"{torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}; "
              f"device-to-device copy {bandwidth / 1e12:.3f} TB/s (read + write)")
    print(header, flush=True)
    rows = []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        for gs in args.group_sizes:
            shape_rows = bench_shape(k, n, gs, args.m or list(range(1, args.max_m + 1)), args.max_m,
                                     bandwidth, args.baselines)
            print(markdown(shape_rows), flush=True)
            rows += shape_rows
    report = f"{header}\n\n{markdown(rows)}\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
