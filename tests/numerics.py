"""Random operands of the op and the comparisons the tests make against the reference."""

from __future__ import annotations

import torch
from et_int4.backends.cuda.int4.packing import symmetric_zero, tile_weights, unpack_nibbles, untile_weights
from et_int4.backends.cuda.int4.reference import quantize_activation_blocks


def random_operands(m: int, n: int, k: int, group_size: int, *, generator: torch.Generator,
                    device: str = "cpu", zeros: str = "group"):
    """Random packed weights and activations with a few large outliers: ``(x, qdata, scale, zero)`` in
    the op's (tiled) format. zeros: "group" (random, one per group), "row" (random, one per row) or
    "symmetric" (8 everywhere, in its own layout)."""
    groups = k // group_size
    qdata = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=generator)
    scale = (torch.rand(n, groups, device=device, generator=generator) * 0.02 + 1e-3).to(torch.bfloat16)
    zero = torch.randint(0, 16, (n, groups if zeros == "group" else 1), dtype=torch.int8, device=device,
                         generator=generator)
    qdata, scale, zero = tile_weights(qdata, scale, zero)
    if zeros == "symmetric":
        zero = symmetric_zero(n, device)
    x = torch.randn(m, k, device=device, generator=generator)
    outliers = torch.rand(m, k, device=device, generator=generator) < 0.01
    x = torch.where(outliers, x * 50, x).to(torch.bfloat16)
    return x, qdata, scale, zero


def assert_within_one_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    """The reference's numerics up to fp32 summation order: at most about one bf16 rounding apart."""
    out, ref = out.float(), ref.float()
    assert out.shape == ref.shape
    if not ref.numel():  # M = 0
        return
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    tolerance = ref.abs() * 2**-7 + ref.abs().amax() * 1e-3 + 1e-6
    bad = (out - ref).abs() > tolerance
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outputs differ; worst at {bad.nonzero()[:4].tolist()}"


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def w4a8_float64(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """The W4A8 numerics in float64 (same int8 activations and block scales), float64 [M, N]."""
    q, d = quantize_activation_blocks(x.cpu())
    rows, s, z = untile_weights(qdata.cpu(), scale.cpu(), zero.cpu())
    u = unpack_nibbles(rows).double()
    z = z.expand_as(s)  # one zero point per row applies to every group
    w = (u - z.double().repeat_interleave(group_size, 1)) * s.double().repeat_interleave(group_size, 1)
    xq = q.double() * d.double().repeat_interleave(32, 1)
    return xq @ w.T
