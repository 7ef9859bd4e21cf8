"""Time et_int4_plain_mm as the runtime calls it (activation quantization included) on a GPU.

Peers, timed in the same run: ExecuTorch's own W4A8 kernels (`int4_plain_mm.cuh` compiled from the
ExecuTorch checkout named by --executorch-src or $ET_INT4_EXECUTORCH_SRC, through
bench/executorch_harness; skipped with a reason without one): its M = 1 matvec, the same matvec
launched with grid.y = M (how ExecuTorch runs M > 4 today) and its multirow body instantiated for 8
rows; PyTorch's tinygemm `_weight_int4pack_mm` (W4A16, its own layout); bf16 `F.linear`.

Bandwidth: "% copy bw" = bytes / time / the device-to-device copy bandwidth measured in the same
run (bytes read + written), where bytes = weights + scales + zeros (et-int4: N*K/2 + 3*N*K/gs with a
zero point per group, N*K/2 + 2*N*K/gs + N with one per row, N*K/2 + 2*N*K/gs + N/32 symmetric; ExecuTorch:
N*K/2 + 2*N*K/gs + 4*N*K/256)
+ activations read (2*M*K) + output written (2*M*N).

Zero points ("zeros" column): "group" is one per row and group (asymmetric weights; ExecuTorch's
format always stores one per group), "row" one per row (the kernels read it once per row), and
"symmetric" torchao's default (every zero point 8), which the pass stores as one 8 per tile and whose
kernels have no zero-point term.

Method: each variant runs inside one CUDA graph that calls it once per copy of the weights, the
copies together larger than L2 so that every call streams its weights from HBM; graph replays are
timed with CUDA events and the median per call is reported.

    python bench/bench_int4_mm.py [--shapes 4096x14336 ...] [--group-sizes 32 128] [--out FILE]
                                  [--executorch-src PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import math
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import et_int4
import torch
import torch.nn.functional as F
from et_int4.backends.cuda.int4.packing import TILE_ROWS, symmetric_zero

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


def call_graph(calls: list) -> torch.cuda.CUDAGraph:
    """A graph that makes the calls in order (one per weight copy), replayed once."""
    for call in calls:  # warm-up: allocations and lazy initialization stay out of the graph
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return graph


def per_call_us(calls: list) -> float:
    """Median time of one call, from a graph replaying one call per weight copy."""
    return median_us(call_graph(calls).replay) / len(calls)


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(ROTATION_BYTES / nbytes))


HARNESS = Path(__file__).resolve().parent / "executorch_harness"


def harness_build(header: Path, harness: Path = HARNESS) -> tuple[list[str], str]:
    """The nvcc command (less its output) that builds the harness over ``header``, and the key its library
    is cached under: a hash of the command and of every file the build reads, so that any edit rebuilds."""
    stubs = harness / "stubs"
    command = ["nvcc", "-O3", "-std=c++17", "-arch=sm_90", "-shared", "-Xcompiler", "-fPIC",
               "-I", str(stubs), f'-DET_INT4_EXECUTORCH_CUH="{header}"', str(harness / "harness.cu")]
    digest = hashlib.sha256("\0".join(command).encode())
    for path in [header, harness / "harness.cu", *sorted(p for p in stubs.rglob("*") if p.is_file())]:
        digest.update(f"\0{path}\0".encode() + path.read_bytes())  # the name too: a stub may be renamed
    return command, digest.hexdigest()[:16]


class ExecuTorchKernels:
    """ExecuTorch's int4_plain_mm.cuh from a source checkout, built with our harness and stub headers."""

    HEADER = "backends/cuda/runtime/shims/int4_plain_mm.cuh"
    SUPER_BLOCK = 256  # its per-256 scale and zero steps

    def __init__(self, source: str):
        header = Path(source).resolve() / self.HEADER
        if not header.is_file():
            raise FileNotFoundError(f"{header} does not exist: --executorch-src must name an ExecuTorch checkout")
        command, key = harness_build(header)
        lib = Path(tempfile.gettempdir()) / f"et_int4_executorch_harness_{key}.so"
        if not lib.is_file():
            subprocess.run([*command, "-o", str(lib)], check=True)
        self.lib = ctypes.CDLL(str(lib))
        self.lib.et_harness_q8_bytes.restype = ctypes.c_size_t
        self.lib.et_harness_int4_mm.restype = ctypes.c_int
        self.lib.et_harness_int4_mm.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 8 + [ctypes.c_int] * 4
                                                + [ctypes.c_void_p])
        self.source = str(header)

    def weights(self, n: int, k: int, group_size: int, gen: torch.Generator) -> tuple:
        groups, supers = k // group_size, k // self.SUPER_BLOCK
        return (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen),
                torch.randint(0, 256, (n, groups), dtype=torch.uint8, device="cuda", generator=gen),
                (torch.rand(n, supers, device="cuda", generator=gen) * 1e-3).half(),
                torch.randint(0, 256, (n, groups), dtype=torch.uint8, device="cuda", generator=gen),
                (torch.rand(n, supers, device="cuda", generator=gen) * 1e-2).half())

    @staticmethod
    def weight_bytes(n: int, k: int, group_size: int) -> int:
        return n * k // 2 + 2 * n * (k // group_size) + 4 * n * (k // ExecuTorchKernels.SUPER_BLOCK)

    def call(self, variant: int, x: torch.Tensor, w: tuple, out: torch.Tensor, q8: torch.Tensor,
             group_size: int) -> None:
        m, k = x.shape
        err = self.lib.et_harness_int4_mm(variant, x.data_ptr(), *(t.data_ptr() for t in w), q8.data_ptr(),
                                          out.data_ptr(), m, out.shape[1], k, group_size,
                                          torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"ExecuTorch kernel variant {variant} failed to launch: CUDA error {err}")


ET_PER_ROW, ET_DISPATCHED, ET_MULTIROW_8 = 0, 1, 2


def bench_shape(k: int, n: int, group_size: int, ms: list[int], max_m: int, bandwidth: float,
                baselines: bool, executorch: ExecuTorchKernels | None, zero_points: list[str]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(k * n + group_size)
    groups = k // group_size
    tiles = n // TILE_ROWS
    zero_columns = {"group": groups * TILE_ROWS, "row": TILE_ROWS, "symmetric": 1}
    int4_bytes = {z: n * k // 2 + n * groups * 2 + tiles * zero_columns[z] for z in zero_points}
    # Random bytes in the tiled layout's shapes (the layout is a permutation: timing is the same).
    weights = {z: [
        (torch.randint(0, 256, (tiles, k * 16), dtype=torch.uint8, device="cuda", generator=gen),
         (torch.rand(tiles, groups * TILE_ROWS, device="cuda", generator=gen) * 0.02).to(torch.bfloat16),
         torch.randint(0, 16, (tiles, zero_columns[z]), dtype=torch.int8, device="cuda", generator=gen)
         if z != "symmetric" else symmetric_zero(n, "cuda"))
        for _ in range(copies_for(int4_bytes[z]))
    ] for z in zero_points}
    if baselines:
        # tinygemm: its own packed layout of nibbles; bf16 scales-and-zeros [K/gs, N, 2].
        tiny = [(torch._convert_weight_to_int4pack(
                    torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen), 8),
                 torch.stack([s.reshape(n, -1).t().float(), torch.randn(groups, n, device="cuda", generator=gen)],
                             dim=-1).bfloat16().contiguous())
                for _, s, _ in weights[zero_points[0]]]
        dense = [torch.randn(n, k, device="cuda", generator=gen).bfloat16()
                 for _ in range(copies_for(n * k * 2))]
    if executorch is not None:
        et_bytes = ExecuTorchKernels.weight_bytes(n, k, group_size)
        et_weights = [executorch.weights(n, k, group_size, gen) for _ in range(copies_for(et_bytes))]
    op = torch.ops.et_int4.et_int4_plain_mm

    rows = {z: [] for z in zero_points}
    for m in ms:
        x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
        io_bytes = m * k * 2 + m * n * 2
        row = dict(k=k, n=n, group_size=group_size, m=m)  # the peers' columns, shared by both zero layouts
        if baselines:
            row["tinygemm"] = per_call_us([lambda t=t: torch._weight_int4pack_mm(x, t[0], group_size, t[1])
                                           for t in tiny])
            row["bf16"] = per_call_us([lambda w=w: F.linear(x, w) for w in dense])
        if executorch is not None:
            out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            q8 = torch.empty(executorch.lib.et_harness_q8_bytes(m, k), dtype=torch.uint8, device="cuda")

            def et_time(variant: int) -> float:
                return per_call_us([lambda w=w: executorch.call(variant, x, w, out, q8, group_size)
                                    for w in et_weights])

            row["et"] = et_time(ET_PER_ROW if m > 4 else ET_DISPATCHED)
            row["et_pct_bw"] = 100 * (et_bytes + io_bytes) / bandwidth * 1e6 / row["et"]
            if m == 8:
                row["et_multirow"] = et_time(ET_MULTIROW_8)
        for z in zero_points:
            ours = dict(row, zeros=z, floor=(int4_bytes[z] + io_bytes) / bandwidth * 1e6,
                        ours=per_call_us([lambda w=w: op(x, *w, group_size, max_m) for w in weights[z]]))
            ours["pct_bw"] = 100 * ours["floor"] / ours["ours"]
            for peer in ("et", "et_multirow", "tinygemm"):
                if peer in ours:
                    ours[f"vs_{peer}"] = ours[peer] / ours["ours"]
            rows[z].append(ours)
    for z_rows in rows.values():
        for row in z_rows:
            row["vs_m1"] = row["ours"] / z_rows[0]["ours"]  # z_rows[0] is the smallest M asked for
    return [row for z in zero_points for row in rows[z]]


# (header, format); a cell whose value a row lacks is "-", a column no row has is left out.
COLUMNS = [("K x N", "{k} x {n}"), ("gs", "{group_size}"), ("zeros", "{zeros}"), ("M", "{m}"),
           ("et_int4 us", "{ours:.2f}"),
           ("% copy bw", "{pct_bw:.0f}%"), ("t(M)/t(1)", "{vs_m1:.2f}"),
           ("ExecuTorch us", "{et:.2f}"), ("ET % copy bw", "{et_pct_bw:.0f}%"), ("ET / et_int4", "{vs_et:.2f}"),
           ("ET multirow-8 us", "{et_multirow:.2f}"), ("multirow-8 / et_int4", "{vs_et_multirow:.2f}"),
           ("tinygemm us", "{tinygemm:.2f}"), ("tinygemm / et_int4", "{vs_tinygemm:.2f}"),
           ("bf16 us", "{bf16:.2f}"), ("floor us", "{floor:.2f}")]


def _key(fmt: str) -> str:
    return fmt[1:].split("}")[0].split(":")[0]


def markdown(rows: list[dict]) -> str:
    columns = [(name, fmt) for name, fmt in COLUMNS if any(_key(fmt) in r for r in rows)]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt.format(**r) if _key(fmt) in r else "-" for _, fmt in columns) + " |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="K x N, e.g. 4096x14336")
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--zero-points", nargs="+", choices=["group", "row", "symmetric"],
                        default=["group", "row", "symmetric"],
                        help="et_int4 weights with a zero point per group, one per row, and/or symmetric ones")
    parser.add_argument("--max-m", type=int, default=et_int4.SHIM_GEMM_MAX_M)
    parser.add_argument("--m", type=int, nargs="+", help="row counts (default 1..max-m)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="time et_int4 only (for sweeps)")
    parser.add_argument("--out", help="also write the markdown report here")
    parser.add_argument("--executorch-src", default=os.environ.get("ET_INT4_EXECUTORCH_SRC"),
                        help="ExecuTorch checkout whose int4_plain_mm.cuh to time (default $ET_INT4_EXECUTORCH_SRC)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    executorch = None
    if not args.baselines:
        print("ExecuTorch rows skipped: --no-baselines")
    elif args.executorch_src is None:
        print("ExecuTorch rows skipped: no checkout named (--executorch-src or $ET_INT4_EXECUTORCH_SRC)")
    else:
        executorch = ExecuTorchKernels(args.executorch_src)

    bandwidth = copy_bandwidth()
    header = (f"{torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}; "
              f"device-to-device copy {bandwidth / 1e12:.3f} TB/s (read + write)"
              + (f"; ExecuTorch kernels from {executorch.source}" if executorch else ""))
    print(header, flush=True)
    rows = []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        for gs in args.group_sizes:
            shape_rows = bench_shape(k, n, gs, args.m or list(range(1, args.max_m + 1)), args.max_m,
                                     bandwidth, args.baselines, executorch, args.zero_points)
            print(markdown(shape_rows), flush=True)
            rows += shape_rows
    report = f"{header}\n\n{markdown(rows)}\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
