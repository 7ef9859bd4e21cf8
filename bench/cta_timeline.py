"""Per-CTA timeline of a chain of calls, from an instrumented build of the kernels (diagnostic; GPU only).

`instrument` copies the sources (CMakeLists.txt, backends/, runtime/) to OUT, adds per-CTA records to
int4_mm.cu and builds OUT/build/libet_int4.so. Each CTA of either kernel records %globaltimer at its start, after
its wait and at its end (the GEMM also after issuing its first loads and after its stages), with %smid and
%gridid. `run` replays a graph of calls (bench_int4_mm.py's, one weight copy per
call) once at a time with that library, and prints per M the medians over the calls of when each phase ends, in us
from the end of the GEMM ahead, the kernel the quantizer waits for (bench/RESULTS.md, fourteenth round of issue 8):

    python bench/cta_timeline.py instrument /tmp/cta [-D ET_INT4_STAGE_BLOCKS=8 ...]
    ET_INT4_LIBRARY=/tmp/cta/build/libet_int4.so python bench/cta_timeline.py run 4096 4096 32 1 2 4 8 [--zeros row]

GEMM records come from plans without split K only (their CTAs' one exit).
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPACITY = 1 << 18  # records kept per replay

RECORDER = r"""
struct CtaRecord { unsigned long long grid, t[6]; unsigned kind, block, smid, pad; };  // kind 1: quantizer
__device__ CtaRecord g_cta_records[CAPACITY];
__device__ unsigned g_cta_count;
extern "C" __attribute__((visibility("default"))) int et_int4_cta_records(void* dst, unsigned cap) {
  unsigned n = 0;
  const unsigned zero = 0;
  if (cudaDeviceSynchronize() != cudaSuccess || cudaMemcpyFromSymbol(&n, g_cta_count, sizeof(n)) != cudaSuccess)
    return -1;
  n = n < cap ? n : cap;
  n = n < CAPACITY ? n : CAPACITY;
  if (cudaMemcpyFromSymbol(dst, g_cta_records, n * sizeof(CtaRecord)) != cudaSuccess ||
      cudaMemcpyToSymbol(g_cta_count, &zero, sizeof(zero)) != cudaSuccess)
    return -1;
  return static_cast<int>(n);
}
__device__ __forceinline__ unsigned long long cta_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void cta_record(unsigned slot, unsigned kind, unsigned long long t0, unsigned long long t1,
                                           unsigned long long t2, unsigned long long t3, unsigned long long t4) {
  if (slot >= CAPACITY) return;
  unsigned long long grid;
  unsigned sm;
  asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  g_cta_records[slot] = CtaRecord{grid, {t0, t1, t2, t3, t4, cta_now()}, kind, blockIdx.x, sm, 0};
}
""".replace("CAPACITY", str(CAPACITY))

def start(kernel: str) -> str:
    """A CTA's start time and record slot (one per CTA: thread 0 records)."""
    return (f"  const unsigned long long {kernel}0 = cta_now();\n"
            f"  const unsigned {kernel}_slot = threadIdx.x == 0 ? atomicAdd(&g_cta_count, 1u) : 0u;\n")


def now(name: str) -> str:
    return f"  const unsigned long long {name} = cta_now();\n"


# (anchor in int4_mm.cu, text, placed before or after the anchor or in its place); each anchor occurs once.
WAIT = "  wait_for_prerequisites();  // weights never depend on the kernel before us; activations do\n"
EDITS = [
    ("namespace et_int4::cuda {\nnamespace {\n", RECORDER, "before"),
    # quantizer: start, after its wait, end
    ("  // Before its griddepcontrol.wait the GEMM reads only the weights, which no kernel writes.\n", start("q"),
     "before"),
    ("  if (blockIdx.x == 0)\n", now("q1"), "before"),
    ("  store(q);\n", "  if (threadIdx.x == 0) cta_record(q_slot, 1, q0, 0, q1, 0, 0);\n", "after"),
    # GEMM: start, loads issued, after the wait, stages done, end
    ("  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;\n", start("g"), "before"),
    (WAIT, now("g1"), "before"),
    (WAIT, now("g2"), "after"),
    ("  __syncthreads();\n  float* mine =", "  __syncthreads();\n" + now("g4") + "  float* mine =", "replace"),
    ("  if (p.splits == 1) return;\n",
     "  if (p.splits == 1) {\n    if (threadIdx.x == 0) cta_record(g_slot, 2, g0, g1, g2, 0, g4);\n    return;\n  }\n",
     "replace"),
]


def instrumented(source: str) -> str:
    """int4_mm.cu's text with the CTA records added."""
    for anchor, added, where in EDITS:
        if source.count(anchor) != 1:
            raise SystemExit(f"int4_mm.cu has {source.count(anchor)} copies of an anchor of this script, not one: "
                             f"update EDITS for the kernel as it is now.\nanchor: {anchor!r}")
        source = source.replace(anchor, {"before": added + anchor, "after": anchor + added, "replace": added}[where])
    return source


def instrument(out: Path, defines: list[str]) -> Path:
    """Writes the instrumented sources to OUT and builds them; returns the library."""
    for name in ("CMakeLists.txt", "backends", "runtime"):
        dst = out / name
        if dst.is_dir():
            shutil.rmtree(dst)
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, dst)
    kernel = out / "backends/cuda/int4/int4_mm.cu"
    kernel.write_text(instrumented(kernel.read_text()))
    flags = " ".join(f"-D{d}" for d in defines)
    build = out / "build"
    subprocess.run(["cmake", "-S", str(out), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DCMAKE_CUDA_FLAGS={flags}"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "8"], check=True)
    return build / "libet_int4.so"


PHASES = {  # column: (kernel, field, statistic over the call's CTAs)
    "period": ("gemm", 5, max),
    "quantizer SMs": ("quant", "sms", None),
    "quantizer waited": ("quant", 2, max),
    "quantizer ends": ("quant", 5, max),
    "GEMM CTAs start (median)": ("gemm", 0, statistics.median),
    "GEMM CTAs start (last)": ("gemm", 0, max),
    "GEMM loads issued (last)": ("gemm", 1, max),
    "GEMM waited": ("gemm", 2, max),
    "GEMM stages done (median)": ("gemm", 4, statistics.median),
    "GEMM ends (median)": ("gemm", 5, statistics.median),
}


def run(k: int, n: int, group_size: int, ms: list[int], zeros: str, copies: int, replays: int) -> None:
    import et_int4
    import numpy as np
    import torch
    from bench_int4_mm import call_graph  # bench/, this script's folder
    from et_int4 import runtime
    from profile_one import random_weights

    record = np.dtype([("grid", "u8"), ("t", "u8", 6), ("kind", "u4"), ("block", "u4"), ("smid", "u4"), ("pad", "u4")])
    lib = runtime.load()
    if not hasattr(lib, "et_int4_cta_records"):
        raise SystemExit(f"{runtime.library_path()} is not instrumented: set ET_INT4_LIBRARY to `instrument`'s build")
    buf = np.zeros(CAPACITY, dtype=record)

    def records():
        count = lib.et_int4_cta_records(buf.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint(CAPACITY))
        if count < 0:
            raise SystemExit("reading the CTA records failed")
        return buf[:count].copy()

    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [random_weights(k, n, group_size, zeros, gen) for _ in range(copies)]
    op = torch.ops.et_int4.et_int4_plain_mm
    print(f"{torch.cuda.get_device_name()}, {k} x {n}, gs {group_size}, {zeros} zeros: "
          f"medians over the calls of {replays} replays of {copies}, us from the end of the GEMM ahead")
    print("| M | calls | " + " | ".join(PHASES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in PHASES) + " |")
    for m in ms:
        x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
        graph = call_graph([lambda w=w: op(x, *w, group_size, et_int4.SHIM_GEMM_MAX_M) for w in weights])
        for _ in range(10):
            graph.replay()
        records()
        rows = {name: [] for name in PHASES}
        for _ in range(replays):  # one replay at a time: a graph's replays share their grid ids
            graph.replay()
            r = records()
            grids = sorted((r[r["grid"] == g] for g in np.unique(r["grid"])), key=lambda c: int(c["t"][:, 0].min()))
            kernels = ["quant" if c["kind"][0] == 1 else "gemm" for c in grids]
            for i in range(1, len(grids) - 1):
                if kernels[i - 1:i + 2] != ["gemm", "quant", "gemm"]:
                    continue
                ahead = int(grids[i - 1]["t"][:, 5].max())
                ctas = {"quant": grids[i], "gemm": grids[i + 1]}
                for name, (kernel, field, stat) in PHASES.items():
                    c = ctas[kernel]
                    if field == "sms":
                        rows[name].append(len(np.unique(c["smid"])))
                    else:
                        rows[name].append(stat([(int(t) - ahead) / 1e3 for t in c["t"][:, field]]))
        if not rows["period"]:
            raise SystemExit(f"M = {m}: no GEMM records (a plan with split K?)")
        cells = [f"{statistics.median(v):.2f}" for v in rows.values()]
        print(f"| {m} | {len(rows['period'])} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("instrument", help="write and build the instrumented sources")
    build.add_argument("out", type=Path)
    build.add_argument("-D", dest="defines", action="append", default=[], help="a compile definition (a knob)")
    timeline = sub.add_parser("run", help="time a chain of calls with the instrumented library")
    timeline.add_argument("k", type=int)
    timeline.add_argument("n", type=int)
    timeline.add_argument("group_size", type=int)
    timeline.add_argument("m", type=int, nargs="+")
    timeline.add_argument("--zeros", choices=("group", "row", "symmetric"), default="row")
    timeline.add_argument("--copies", type=int, default=24, help="calls per graph, one per weight copy")
    timeline.add_argument("--replays", type=int, default=3)
    args = parser.parse_args()
    if args.command == "instrument":
        args.out.mkdir(parents=True, exist_ok=True)
        print(instrument(args.out, args.defines))
    else:
        run(args.k, args.n, args.group_size, args.m, args.zeros, args.copies, args.replays)


if __name__ == "__main__":
    main()
