"""The CUDA kernels against the Python reference (GPU only; skipped elsewhere with a reason)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import et_int4
import pytest
import torch
from et_int4 import runtime
from numerics import assert_within_one_rounding, random_operands, rel_error, w4a8_float64

pytestmark = pytest.mark.cuda

SHAPES = [(n, k) for n in (32, 96, 4096, 14336) for k in (32, 256, 4096, 5376)]
GROUP_SIZES = (32, 64, 128, 256)


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    # The reference computes exact int32 block dots with fp32 matmuls: no TF32 there.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def run_op(x, qdata, scale, zero, group_size):
    return torch.ops.et_int4.et_int4_plain_mm(x, qdata, scale, zero, group_size, et_int4.SHIM_GEMM_MAX_M)


def poison_next_output(m: int, n: int) -> None:
    """Leave a NaN-filled block of the output's size in the caching allocator, to be reused."""
    torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")


def assert_matches_reference(out: torch.Tensor, x, qdata, scale, zero, group_size) -> None:
    ref = et_int4.w4a8_reference(x, qdata, scale, zero, group_size)
    assert_within_one_rounding(out, ref)
    assert rel_error(out, ref) <= 2**-8


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_reference_for_every_m(n, k, group_size):
    if k % group_size:
        pytest.skip(f"group_size {group_size} does not divide K={k}")
    gen = torch.Generator(device="cuda").manual_seed(n * 7919 + k * 31 + group_size)
    for m in range(1, et_int4.SHIM_GEMM_MAX_M + 1):
        x, qdata, scale, zero = random_operands(m, n, k, group_size, generator=gen, device="cuda")
        poison_next_output(m, n)
        out = run_op(x, qdata, scale, zero, group_size)
        assert_matches_reference(out, x, qdata, scale, zero, group_size)


@pytest.mark.parametrize("zeros,width", [("row", 32), ("symmetric", 1)])
@pytest.mark.parametrize("n,k,group_size", [(96, 4096, 32), (4096, 5376, 32), (160, 4224, 64), (64, 4096, 128),
                                            (32, 768, 96), (14336, 4096, 256), (4096, 4096, 32), (4096, 4032, 64)])
def test_one_zero_point_per_row_and_symmetric_match_reference_for_every_m(n, k, group_size, zeros, width):
    gen = torch.Generator(device="cuda").manual_seed(n + k + group_size)
    for m in range(1, et_int4.SHIM_GEMM_MAX_M + 1):
        x, qdata, scale, zero = random_operands(m, n, k, group_size, generator=gen, device="cuda", zeros=zeros)
        assert zero.shape == (n // 32, width)
        poison_next_output(m, n)
        assert_matches_reference(run_op(x, qdata, scale, zero, group_size), x, qdata, scale, zero, group_size)


def test_symmetric_zero_other_than_8_makes_its_tile_nan():
    # The host cannot read the zero tensor: a symmetric layout whose entry is not 8 must not give numbers.
    gen = torch.Generator(device="cuda").manual_seed(11)
    for m in (1, 5):
        x, qdata, scale, zero = random_operands(m, 96, 1024, 32, generator=gen, device="cuda", zeros="symmetric")
        zero[1] = 7
        out = run_op(x, qdata, scale, zero, 32).cpu()
        assert out[:, 32:64].isnan().all()
        assert not out[:, :32].isnan().any() and not out[:, 64:].isnan().any()


@pytest.mark.parametrize("zeros", ["group", "symmetric"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_error_against_float64_w4a8_for_every_m(group_size, zeros):
    # Activations with outlier channels; the fp32 kernel within 4e-3 of the exact W4A8 result.
    gen = torch.Generator(device="cuda").manual_seed(group_size)
    for m in range(1, et_int4.SHIM_GEMM_MAX_M + 1):
        x, qdata, scale, zero = random_operands(m, 4096, 4096, group_size, generator=gen, device="cuda", zeros=zeros)
        out = run_op(x, qdata, scale, zero, group_size)
        assert rel_error(out.cpu(), w4a8_float64(x, qdata, scale, zero, group_size)) <= 4e-3


def test_non_finite_activation_blocks_make_their_rows_nan():
    gen = torch.Generator(device="cuda").manual_seed(3)
    x, qdata, scale, zero = random_operands(4, 256, 1024, 64, generator=gen, device="cuda")
    x[0, 100] = float("nan")
    x[2, 700] = float("inf")
    x[3, 5] = -float("inf")
    out = run_op(x, qdata, scale, zero, 64).cpu()
    ref = et_int4.w4a8_reference(x.cpu(), qdata.cpu(), scale.cpu(), zero.cpu(), 64)
    for row in (0, 2, 3):
        assert out[row].isnan().all() and ref[row].isnan().all()
    assert_within_one_rounding(out[1:2], ref[1:2])


@pytest.mark.parametrize("n,k,group_size", [(320, 4224, 96), (160, 96, 96), (64, 160, 32), (32, 4160, 64),
                                            (64, 4800, 160), (128, 8192, 1024), (4096, 4032, 64)])
def test_group_sizes_and_k_off_the_fast_paths(n, k, group_size):
    # Group sizes that are no power of two read their scales per block; K that is no multiple of a
    # stage or a split leaves partial stages (4096 x 4032: wide CTAs whose warps load both their
    # stages before the wait, the second one partial; its quantizer's 8-block warps, the last one
    # past the end of K).
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    for m in (1, 3, et_int4.SHIM_GEMM_MAX_M):
        x, qdata, scale, zero = random_operands(m, n, k, group_size, generator=gen, device="cuda")
        poison_next_output(m, n)
        assert_matches_reference(run_op(x, qdata, scale, zero, group_size), x, qdata, scale, zero, group_size)


@pytest.mark.parametrize("n,k,group_size", [(5120, 5120, 32), (6144, 4096, 128), (96, 3584, 64)])
def test_small_ctas_with_split_k_match_reference(n, k, group_size):
    # On an H100 (132 SMs) the plan runs these as 4-warp CTAs whose tiles split K (in 3, 2 and 7),
    # where 8-warp or wide CTAs would take two or three waves: their partial sums meet at the tickets.
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    for m in (1, 2, et_int4.SHIM_GEMM_MAX_M):
        x, qdata, scale, zero = random_operands(m, n, k, group_size, generator=gen, device="cuda")
        poison_next_output(m, n)
        launched = gpu_work(lambda: assert_matches_reference(run_op(x, qdata, scale, zero, group_size),
                                                             x, qdata, scale, zero, group_size))
        if torch.cuda.get_device_properties(0).multi_processor_count == 132 and et_int4.SHIM_GEMM_MAX_M <= 8:
            assert any("w4a8_gemm<4," in name for name in launched), launched


def test_split_k_tickets_start_from_zero_in_every_call():
    # Each call's quantizer zeroes split K's per-tile tickets, which the call before left counted up in
    # the workspace that the caching allocator hands out again. 2048 x 4096 has 64 row tiles, split in
    # two on an H100: more tickets than the m = 1 quantizer's CTA has threads.
    gen = torch.Generator(device="cuda").manual_seed(2048)
    for m in (1, 1, 8, 1):
        x, qdata, scale, zero = random_operands(m, 2048, 4096, 32, generator=gen, device="cuda")
        poison_next_output(m, 2048)
        assert_matches_reference(run_op(x, qdata, scale, zero, 32), x, qdata, scale, zero, 32)


@pytest.mark.parametrize("zeros", ["group", "symmetric"])
@pytest.mark.parametrize("n,k", [(14336, 5376), (4096, 4160), (96, 4096), (5120, 5120)])
def test_a_row_comes_out_the_same_whatever_m_and_call(n, k, zeros):
    # EAGLE's lossless check compares a verify (M = chain_len + 1) with plain decoding (M = 1): row i
    # must not depend on the other rows, on M, or on which CTA finished a shared tile first.
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x, qdata, scale, zero = random_operands(et_int4.SHIM_GEMM_MAX_M, n, k, 32, generator=gen, device="cuda",
                                            zeros=zeros)
    full = run_op(x, qdata, scale, zero, 32)
    for m in range(1, et_int4.SHIM_GEMM_MAX_M + 1):
        assert torch.equal(run_op(x[m - 1:m].clone(), qdata, scale, zero, 32)[0], full[m - 1]), f"row {m - 1}"
        assert torch.equal(run_op(x[:m].clone(), qdata, scale, zero, 32), full[:m]), f"M = {m}"


def gpu_work(fn) -> list[str]:
    """What ``fn`` ran on the GPU (kernels, copies, sets), by name, as the profiler (CUPTI) saw it."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_no_rows_give_an_empty_output_and_launch_nothing():
    gen = torch.Generator(device="cuda").manual_seed(9)
    x, qdata, scale, zero = random_operands(0, 96, 256, 32, generator=gen, device="cuda")
    one_row = random_operands(1, 96, 256, 32, generator=gen, device="cuda")
    idle = set(gpu_work(lambda: None))  # the profiler's own records, if it makes any
    outputs = []
    launched = gpu_work(lambda: outputs.extend([run_op(x, qdata, scale, zero, 32),
                                                runtime.plain_mm(x, qdata, scale, zero, 32, 4)]))
    assert [name for name in launched if name not in idle] == []
    for out in outputs:
        assert (out.dtype, tuple(out.shape), out.device.type) == (torch.bfloat16, (0, 96), "cuda")
    # The profiler does see the library's launches: one row runs its kernels.
    assert [name for name in gpu_work(lambda: run_op(*one_row, 32)) if name not in idle]


def test_strided_activation_rows():
    # Each half of h.chunk(2, -1) (row stride 2K), as a model feeds it to a linear.
    gen = torch.Generator(device="cuda").manual_seed(7)
    x, qdata, scale, zero = random_operands(5, 128, 512, 64, generator=gen, device="cuda")
    h = torch.cat((x, x.flip(-1)), dim=-1)
    for half in h.chunk(2, -1):
        assert not half.is_contiguous()
        assert_matches_reference(run_op(half, qdata, scale, zero, 64), half.contiguous(), qdata, scale, zero, 64)


@pytest.mark.parametrize("n,k", [(256, 512), (4096, 4032)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_activations_off_16_byte_alignment(m, n, k):
    # x is read with bf16's 2-byte alignment only: an offset view of a row-major tensor is valid input
    # (4096 x 4032: the quantizer whose lanes load 16 bytes where x allows it).
    gen = torch.Generator(device="cuda").manual_seed(11)
    x, qdata, scale, zero = random_operands(m, n, k, 32, generator=gen, device="cuda")
    offset = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view(x.shape)
    offset.copy_(x)
    assert offset.data_ptr() % 16
    assert_matches_reference(run_op(offset, qdata, scale, zero, 32), x, qdata, scale, zero, 32)


def test_all_zero_activation_block_and_int8_qdata():
    gen = torch.Generator(device="cuda").manual_seed(5)
    x, qdata, scale, zero = random_operands(4, 256, 512, 32, generator=gen, device="cuda")
    x[1, 64:96] = 0  # d == 0 for that block
    out = run_op(x, qdata.view(torch.int8), scale, zero, 32)
    assert_matches_reference(out, x, qdata, scale, zero, 32)


def test_cuda_graph_capture_and_replay():
    gen = torch.Generator(device="cuda").manual_seed(11)
    m, n, k, gs = 5, 4096, 4096, 32
    x, qdata, scale, zero = random_operands(m, n, k, gs, generator=gen, device="cuda")
    static_x = x.clone()
    run_op(static_x, qdata, scale, zero, gs)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run_op(static_x, qdata, scale, zero, gs)
    for _ in range(3):
        new_x = random_operands(m, n, k, gs, generator=gen, device="cuda")[0]
        static_x.copy_(new_x)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(static_out, new_x, qdata, scale, zero, gs)


FIRST_CALL_CAPTURED = textwrap.dedent(
    """
    import torch, et_int4
    from numerics import assert_within_one_rounding, random_operands
    g = torch.Generator(device="cuda").manual_seed(12)
    # A fresh process: the op's first calls, each of another kernel, run inside a capture. 4096 x 4096
    # is a plan whose kernels set their shared-memory carveout on first use.
    for m, gs in ((1, 32), (8, 128)):
        x, q, s, z = random_operands(m, 4096, 4096, gs, generator=g, device="cuda")
        static_x = torch.empty_like(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.ops.et_int4.et_int4_plain_mm(static_x, q, s, z, gs, et_int4.SHIM_GEMM_MAX_M)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert_within_one_rounding(out, et_int4.w4a8_reference(x, q, s, z, gs))
    print("captured first calls match")
    """
)


def test_first_calls_inside_a_cuda_graph_capture():
    result = subprocess.run([sys.executable, "-c", FIRST_CALL_CAPTURED], capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).parent)
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "captured first calls match" in report, report


def test_two_streams_run_concurrently_and_correctly():
    gen = torch.Generator(device="cuda").manual_seed(13)
    cases = [random_operands(m, 4096, 4096, 128, generator=gen, device="cuda") for m in (3, 8)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = []
    torch.cuda.synchronize()
    for stream, (x, qdata, scale, zero) in zip(streams, cases):
        with torch.cuda.stream(stream):
            outs.append([run_op(x, qdata, scale, zero, 128) for _ in range(4)])
    torch.cuda.synchronize()
    for results, (x, qdata, scale, zero) in zip(outs, cases):
        for out in results:
            assert_matches_reference(out, x, qdata, scale, zero, 128)


def test_bad_input_on_cuda_raises_and_the_process_goes_on():
    gen = torch.Generator(device="cuda").manual_seed(17)
    x, qdata, scale, zero = random_operands(2, 64, 256, 32, generator=gen, device="cuda")
    with pytest.raises(runtime.ShimError, match="expected every tensor on cuda"):
        runtime.plain_mm(x, qdata.cpu(), scale, zero, 32, 4)
    with pytest.raises(runtime.ShimError, match="16-byte aligned"):
        misaligned = torch.empty(qdata.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view(qdata.shape)
        misaligned.copy_(qdata)
        runtime.plain_mm(x, misaligned, scale, zero, 32, 4)
    with pytest.raises(runtime.ShimError, match="re-export"):
        rows = torch.randint(0, 256, (64, 128), dtype=torch.uint8, device="cuda", generator=gen)
        runtime.plain_mm(x, rows, scale, zero, 32, 4)  # the row-major layout of et-int4 0.1
    assert_matches_reference(run_op(x, qdata, scale, zero, 32), x, qdata, scale, zero, 32)


SANITIZER_CASE = textwrap.dedent(
    """
    import torch, et_int4
    from numerics import random_operands
    g = torch.Generator(device="cuda").manual_seed(0)
    # One call per kernel path: m = 1 / 8 columns, each run length, split K and not, wide, 8-warp and
    # small CTAs (4096 x 4096: wide CTAs whose warps load both their stages before the wait, 4096 x 4032
    # the same with padding columns and a quantizer warp past the end of K; 14336 x 256 and 96 x 3584:
    # 4-warp CTAs, the second with split K), with each layout of zero points.
    for m, n, k, gs in ((3, 96, 256, 32), (8, 64, 160, 32), (1, 32, 4224, 96), (2, 4096, 4096, 64), (6, 4096, 4032, 64),
                        (1, 128, 8192, 128), (5, 14336, 256, 128), (8, 96, 3584, 32)):
        for zeros in ("group", "row", "symmetric"):
            x, q, s, z = random_operands(m, n, k, gs, generator=g, device="cuda", zeros=zeros)
            torch.ops.et_int4.et_int4_plain_mm(x, q, s, z, gs, 8)
    torch.cuda.synchronize()
    print("sanitizer case done")
    """
)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_is_clean(tool):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    result = subprocess.run(
        [sanitizer, f"--tool={tool}", "--error-exitcode=9", sys.executable, "-c", SANITIZER_CASE],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "sanitizer case done" in report, report
    summary = {"memcheck": "ERROR SUMMARY: 0 errors", "racecheck": "RACECHECK SUMMARY: 0 hazards"}[tool]
    assert summary in report, report


def test_quantizer_rounds_as_the_ieee_division_on_every_bf16_pair(tmp_path):
    # The quantizer's q = rint(v / d) takes the division's fast path with one reciprocal per lane and
    # rounds by an FADD: tests/quantizer_rounding.cu checks it against __fdiv_rn and cvt.rni on all
    # 1,065,402,238 pairs of its domain (a finite bf16 amax > 0 and a bf16 v with |v| <= amax).
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    repo = Path(__file__).parents[1]
    major, minor = torch.cuda.get_device_capability()
    binary = tmp_path / "quantizer_rounding"
    build = subprocess.run(
        [nvcc, "-std=c++17", "-O3", f"-arch=sm_{major}{minor}", "-I", str(repo),
         str(repo / "tests/quantizer_rounding.cu"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "1065402238 pairs, 0 mismatches" in result.stdout, result.stdout + result.stderr


# -- the largest shapes validation admits: N and K below 2^31, element indices past 2^31 -------------

def _random_tiled(tiles: int, k: int, group_size: int):
    """Random weights straight in the tiled layout (any bytes are valid): qdata, scale, zero."""
    gen = torch.Generator(device="cuda").manual_seed(tiles + k)
    groups = k // group_size * 32
    qdata = torch.randint(0, 256, (tiles, 16 * k), dtype=torch.uint8, device="cuda", generator=gen)
    scale = (torch.rand(tiles, groups, device="cuda", generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    zero = torch.randint(0, 16, (tiles, groups), dtype=torch.int8, device="cuda", generator=gen)
    return qdata, scale, zero


@pytest.mark.slow
def test_activation_indices_past_2_to_the_31():
    # M * K = 3 * 2^30 elements (6 GiB of activations): the last row's last blocks lie past 2^31.
    m, k, edge = 8, 3 * 2**27, 64
    qdata, scale, zero = _random_tiled(1, k, 32)
    x = torch.zeros(m, k, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    x[0, :edge] = torch.randn(edge, device="cuda", generator=gen)
    x[m - 1, -edge:] = torch.randn(edge, device="cuda", generator=gen)
    x[3, :edge] = x[3, -edge:] = torch.randn(edge, device="cuda", generator=gen)
    out = run_op(x, qdata, scale, zero, 32)
    # All-zero blocks add exactly 0: the result is that of the first and last blocks alone.
    record, group = edge // 32 * 512, edge // 32 * 32
    ends = (torch.cat((x[:, :edge], x[:, -edge:]), 1), torch.cat((qdata[:, :record], qdata[:, -record:]), 1),
            torch.cat((scale[:, :group], scale[:, -group:]), 1), torch.cat((zero[:, :group], zero[:, -group:]), 1))
    del x, qdata
    assert_matches_reference(out, *ends, 32)
    assert out[1].abs().max() == 0


@pytest.mark.slow
def test_output_indices_past_2_to_the_31():
    # M * N = 8 * (2^28 + 2^26) outputs: the last row's last columns lie past 2^31.
    m, n, k = 8, 2**28 + 2**26, 32
    qdata, scale, zero = _random_tiled(n // 32, k, 32)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = run_op(x, qdata, scale, zero, 32)
    for rows in (slice(0, 2), slice(n // 32 - 2, n // 32)):
        assert_matches_reference(out[:, rows.start * 32:rows.stop * 32], x, qdata[rows], scale[rows], zero[rows], 32)


@pytest.mark.slow
@pytest.mark.parametrize("n, k", [(32, 2**31), (2**31, 32)], ids=["k-2^31", "n-2^31"])
def test_n_or_k_of_2_to_the_31_is_refused(n, k):
    # The kernels index N and K in 32 bits: validation refuses them before any launch (36-38 GiB here).
    x = torch.empty(1, k, dtype=torch.bfloat16, device="cuda")
    qdata = torch.empty(n // 32, 16 * k, dtype=torch.uint8, device="cuda")
    scale = torch.ones(n // 32, 32, dtype=torch.bfloat16, device="cuda")
    zero = torch.zeros(n // 32, 32, dtype=torch.int8, device="cuda")
    with pytest.raises(runtime.ShimError, match=f"expected N and K below 2\\^31, got N = {n}, K = {k}"):
        run_op(x, qdata, scale, zero, k)
