"""The W4A8 reference: its activation quantization, its formula, and its error against exact math."""

from __future__ import annotations

import et_int4
import pytest
import torch
from et_int4 import pack_int4, runtime, w4a8_reference
from et_int4.backends.cuda.int4.reference import quantize_activation_blocks
from numerics import random_operands, rel_error


def _packed(n: int, k: int, group_size: int, asymmetric: bool):
    qdata = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group_size) * 0.02 + 0.001).to(torch.bfloat16)
    zero_point = (torch.randint(-8, 8, scale.shape, dtype=torch.int8) if asymmetric
                  else torch.zeros(scale.shape, dtype=torch.int8))
    return pack_int4(qdata, scale, zero_point), (qdata, scale, zero_point)


def _exact(x: torch.Tensor, weights) -> torch.Tensor:
    """float64 dequantize + matmul: the W4A16 result the W4A8 reference approximates."""
    qdata, scale, zero_point = weights
    group_size = qdata.shape[1] // scale.shape[1]
    w = (qdata.double() - zero_point.double().repeat_interleave(group_size, 1)) \
        * scale.double().repeat_interleave(group_size, 1)
    return x.double() @ w.T


def _activations(m: int, k: int, outliers: bool) -> torch.Tensor:
    x = torch.randn(m, k)
    if outliers:
        # A few large channels, as in LLM activations: they coarsen their whole block's step.
        idx = torch.randint(0, k, (m, max(1, k // 256)))
        x.scatter_(1, idx, torch.randn(idx.shape).sign() * 20)
    return x.to(torch.bfloat16)


def test_quantize_activation_blocks() -> None:
    x = _activations(5, 256, outliers=True)
    q, d = quantize_activation_blocks(x)
    assert (q.dtype, q.shape, d.dtype, d.shape) == (torch.int8, (5, 256), torch.float32, (5, 8))
    blocks = x.float().reshape(5, 8, 32)
    torch.testing.assert_close(d, blocks.abs().amax(-1) / 127, rtol=0, atol=0)
    qb = q.reshape(5, 8, 32).int()
    assert int(qb.abs().max()) <= 127
    assert torch.equal(qb.abs().amax(-1), torch.full((5, 8), 127, dtype=torch.int32))
    # Each value is the nearest multiple of d.
    assert bool(((qb * d[..., None] - blocks).abs() <= d[..., None] * 0.5001).all())


def test_rounds_half_to_even() -> None:
    # amax = 127 gives d = 1 exactly, so x / d lands on the halves.
    block = torch.tensor([127.0, -0.5, 0.5, 1.5, 2.5, -2.5, 3.5] + [0.25] * 25, dtype=torch.bfloat16)
    q, d = quantize_activation_blocks(block[None])
    assert float(d) == 1.0
    assert q[0, :7].tolist() == [127, 0, 0, 2, 2, -2, 4]


def test_zero_block_has_no_nan() -> None:
    x = _activations(3, 128, outliers=False)
    x[1, 32:64] = 0
    q, d = quantize_activation_blocks(x)
    assert float(d[1, 1]) == 0.0 and not bool(q[1, 32:64].any())
    assert bool(d[1, 0] > 0) and bool(q[1, :32].any())
    packed, weights = _packed(32, 128, 64, asymmetric=True)
    y = w4a8_reference(x, packed.qdata, packed.scale, packed.zero, packed.group_size)
    assert bool(torch.isfinite(y.float()).all())
    assert rel_error(y, _exact(x, weights)) < 1e-2
    x[:] = 0
    y = w4a8_reference(x, packed.qdata, packed.scale, packed.zero, packed.group_size)
    assert not bool(y.any())


def _formula(x: torch.Tensor, weights, group_size: int) -> torch.Tensor:
    """The documented formula term by term, with int64 block dots and float64 sums, from the
    unpacked weights (u = q + 8, z = zero_point + 8): independent of the packed layout."""
    q, d = quantize_activation_blocks(x)
    qdata, scale, zero_point = weights
    m, k = x.shape
    n = qdata.shape[0]
    u = qdata.long() + 8
    z = zero_point.long() + 8
    y = torch.zeros(m, n, dtype=torch.float64)
    for g in range(k // group_size):
        acc = torch.zeros(m, n, dtype=torch.float64)
        for b in range(g * group_size // 32, (g + 1) * group_size // 32):
            qb, ub = q[:, b * 32:(b + 1) * 32].long(), u[:, b * 32:(b + 1) * 32]
            inner = qb @ ub.T - z[:, g][None] * qb.sum(1, keepdim=True)
            acc += d[:, b, None].double() * inner.double()
        y += scale[:, g].double()[None] * acc
    return y


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_matches_the_formula(group_size: int, asymmetric: bool) -> None:
    x = _activations(3, 256, outliers=True)
    packed, weights = _packed(64, 256, group_size, asymmetric)
    y = w4a8_reference(x, packed.qdata, packed.scale, packed.zero, group_size)
    assert (y.dtype, y.shape) == (torch.bfloat16, (3, 64))
    # fp32 summation order only: at most one bfloat16 rounding step apart.
    torch.testing.assert_close(y.double(), _formula(x, weights, group_size), rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("outliers", [False, True])
def test_close_to_exact(m: int, group_size: int, asymmetric: bool, outliers: bool) -> None:
    k, n = 512, 96
    x = _activations(m, k, outliers)
    packed, weights = _packed(n, k, group_size, asymmetric)
    y = w4a8_reference(x, packed.qdata, packed.scale, packed.zero, group_size)
    # int8 blocks of 32 cost ~0.6 %; an outlier coarsens its block's step, hence more room.
    assert rel_error(y, _exact(x, weights)) < (2e-2 if outliers else 1e-2)


def test_int8_qdata_is_read_as_bytes() -> None:
    x = _activations(2, 128, outliers=False)
    packed, _ = _packed(32, 128, 32, asymmetric=True)
    args = (packed.scale, packed.zero, 32)
    assert torch.equal(w4a8_reference(x, packed.qdata.view(torch.int8), *args),
                       w4a8_reference(x, packed.qdata, *args))


def test_large_shape() -> None:
    """The largest test shape (K = 5376, N = 14336) runs on CPU; checked on a slice of N."""
    m, k, n = 8, 5376, 14336
    x = _activations(m, k, outliers=False)
    packed, weights = _packed(n, k, 32, asymmetric=True)
    y = w4a8_reference(x, packed.qdata, packed.scale, packed.zero, 32)
    assert y.shape == (m, n)
    rows = slice(n - 512, n)
    assert rel_error(y[:, rows], _exact(x, tuple(w[rows] for w in weights))) < 1e-2


@pytest.mark.skipif(runtime.library_path() is None, reason="libet_int4 is not built")
def test_non_finite_block_makes_its_row_nan_in_both_references() -> None:
    """A NaN or an Inf in an activation block makes every output of its row NaN, in the Python
    reference and in the C++ one (the shim's CPU entry point); other rows are untouched."""
    m, n, k, group_size = 6, 64, 256, 64
    x, qdata, scale, zero = random_operands(m, n, k, group_size, generator=torch.Generator().manual_seed(3))
    x[1, 70] = float("nan")     # block 2 of row 1
    x[3, 5] = float("inf")      # block 0 of row 3
    x[4, 255] = float("-inf")   # the last block of row 4
    bad_rows, good_rows = [1, 3, 4], [0, 2, 5]

    q, d = quantize_activation_blocks(x)
    assert d[1, 2].isnan() and d[3, 0].isnan() and d[4, 7].isnan()
    assert not q[1, 64:96].any() and not q[3, :32].any() and not q[4, 224:].any()
    assert int(d.isnan().sum()) == 3  # the other blocks of those rows keep their scale

    ours = w4a8_reference(x, qdata, scale, zero, group_size)
    shim = runtime.plain_mm(x, qdata, scale, zero, group_size, et_int4.SHIM_GEMM_MAX_M)
    for y in (ours, shim):
        assert (y.dtype, y.shape) == (torch.bfloat16, (m, n))
        assert y[bad_rows].isnan().all(), "every output fed by a non-finite block must be NaN"
        assert y[good_rows].isfinite().all()
    # The CPU entry point is documented bit-compatible with the Python reference (et_int4_shim.h).
    assert torch.equal(shim[good_rows], ours[good_rows])
    # The finite rows are what they would be without the others: no NaN leaked into them.
    clean = x[good_rows]
    assert torch.equal(ours[good_rows], w4a8_reference(clean, qdata, scale, zero, group_size))
    assert torch.equal(shim[good_rows], runtime.plain_mm(clean, qdata, scale, zero, group_size,
                                                         et_int4.SHIM_GEMM_MAX_M))
