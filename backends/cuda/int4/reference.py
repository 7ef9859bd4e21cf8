"""The W4A8 numerics of ``et_int4_plain_mm``, in torch: the op's CPU kernel and the spec the C++
and CUDA kernels match (up to fp32 summation order).

    w[n, k] = (u[n, k] - z[n, g]) * s[n, g]        u in [0, 15], g = k // group_size
    d[m, b] = max|x[m, b]| / 127                    per 32-element block b of each row, fp32;
                                                    NaN where the block holds a NaN or an Inf
    q[m, k] = round(x[m, k] / d[m, b])              round half to even, 0 where d is 0 or NaN, int8
    y[m, n] = sum_g s[n, g] * sum_{b in g} d[m, b] * (dot(u_b, q_b) - z[n, g] * sum(q_b))

Block dot products are exact integers; everything else is fp32; the output is bfloat16. The CUDA
kernels scale a block of symmetric weights (every z = 8) as d * (s * S), s * S exact: one rounding
fewer than (d * S) * s, within the tests' tolerance of this reference.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .limits import DispatchLimitError, check_matvec_max_m
from .packing import (
    ACTIVATION_BLOCK,
    SYMMETRIC_ZERO,
    TILE_BLOCK_BYTES,
    TILE_ROWS,
    check_group_size,
    is_symmetric,
    unpack_nibbles,
    untile_weights,
)

__all__ = ["check_w4a8_args", "quantize_activation_blocks", "w4a8_reference"]

# fp32 elements of unpacked weights held at once by the reference (256 MiB).
_CHUNK_ELEMENTS = 1 << 26


def _expect(cond: bool, arg: str, expected: str, got: object) -> None:
    if not cond:
        raise ValueError(f"et_int4_plain_mm: {arg} must be {expected}, got {got}")


def check_w4a8_args(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int, max_m: int | None = None) -> None:
    """Validate the op's arguments (``max_m`` None: no row limit, as for the reference).

    Raises ValueError (``DispatchLimitError`` for the row limit) naming the argument, what it
    must be and what came.
    """
    _expect(x.dtype == torch.bfloat16, "self", "bfloat16", x.dtype)
    _expect(qdata.dtype in (torch.uint8, torch.int8), "qdata", "uint8 (or int8)", qdata.dtype)
    _expect(scale.dtype == torch.bfloat16, "scale", "bfloat16", scale.dtype)
    _expect(zero.dtype == torch.int8, "zero", "int8", zero.dtype)
    for arg, t, shape in (("self", x, "[M, K]"), ("qdata", qdata, "[N/32, 16*K]"),
                          ("scale", scale, "[N/32, 32*K/group_size]"),
                          ("zero", zero, "[N/32, 32*K/group_size], [N/32, 32] or [N/32, 1]")):
        _expect(t.dim() == 2, arg, f"2-D {shape}", f"shape {tuple(t.shape)}")
    m, k = x.shape
    _expect(not statically_known_true(k < ACTIVATION_BLOCK), "self", f"[M, K] with K >= {ACTIVATION_BLOCK}",
            f"K={k}")
    try:
        check_group_size(group_size, k)
    except ValueError as error:
        raise ValueError(f"et_int4_plain_mm: {error}") from None
    if qdata.shape[1] == k // 2:
        raise ValueError(
            f"et_int4_plain_mm: qdata has shape {tuple(qdata.shape)}, the row-major [N, K/2] layout of "
            f"et-int4 0.1; the op now takes the tiled layout [N/32, 16*K]: re-export the program "
            f"(rewrite_int4_linears and pack_int4 repack the weights)"
        )
    tiles, record_bytes = qdata.shape[0], k // ACTIVATION_BLOCK * TILE_BLOCK_BYTES
    _expect(tiles >= 1 and tuple(qdata.shape) == (tiles, record_bytes), "qdata",
            f"[N/{TILE_ROWS}, 16*K] = [N/{TILE_ROWS}, {record_bytes}] (tiled), with N >= {TILE_ROWS}",
            f"shape {tuple(qdata.shape)}")
    groups = (tiles, k // group_size * TILE_ROWS)
    _expect(tuple(scale.shape) == groups, "scale", f"[N/{TILE_ROWS}, {TILE_ROWS}*K/group_size] = "
            f"{list(groups)} (tiled)", f"shape {tuple(scale.shape)}")
    _expect(tuple(zero.shape) in (groups, (tiles, TILE_ROWS), (tiles, 1)), "zero",
            f"[N/{TILE_ROWS}, {TILE_ROWS}*K/group_size] = {list(groups)} (tiled, one zero point per group), "
            f"[N/{TILE_ROWS}, {TILE_ROWS}] = {[tiles, TILE_ROWS]} (one per row) or [N/{TILE_ROWS}, 1] = "
            f"{[tiles, 1]} (symmetric)", f"shape {tuple(zero.shape)}")
    if max_m is None:
        return
    try:
        check_matvec_max_m(max_m)
    except DispatchLimitError as error:
        raise DispatchLimitError(f"et_int4_plain_mm: max_m (MATVEC_MAX_M at export time): {error}") from None
    # A symbolic M is rejected only when it can never fit; the shim checks the actual M at run time.
    # M = 0 (a dynamic row count at its minimum) gives an empty [0, N] result.
    if statically_known_true(m > max_m):
        raise DispatchLimitError(
            f"et_int4_plain_mm: self must have M <= max_m={max_m} rows, got M={m}; "
            f"linears with more rows stay dequantize + linear (see rewrite_int4_linears)"
        )


def quantize_activation_blocks(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each 32-element block of each row to int8.

    Returns ``(q, d)``: q int8 [M, K] in [-127, 127], d float32 [M, K/32] with x ~= q * d.
    """
    _expect(x2d.dim() == 2 and x2d.shape[1] % ACTIVATION_BLOCK == 0, "x2d",
            f"2-D [M, K] with K a multiple of {ACTIVATION_BLOCK}", f"shape {tuple(x2d.shape)}")
    m, k = x2d.shape
    x = x2d.float().reshape(m, k // ACTIVATION_BLOCK, ACTIVATION_BLOCK)
    finite = x.isfinite().all(dim=-1)
    d = torch.where(finite, x.abs().amax(dim=-1) / 127, torch.nan)
    q = torch.round(x / d.unsqueeze(-1))
    # An all-zero block has d == 0 (0 / 0 is NaN there) and a non-finite one d = NaN: q is 0 in both.
    q = torch.where((d.unsqueeze(-1) == 0) | ~finite.unsqueeze(-1), 0.0, q)
    return q.to(torch.int8).reshape(m, k), d


def w4a8_reference(x2d: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """``y = x2d @ W^T`` with W4A8 numerics; arguments in the op's tiled format, bfloat16 [M, N] out."""
    check_w4a8_args(x2d, qdata, scale, zero, group_size)
    if is_symmetric(zero) and not bool((zero == SYMMETRIC_ZERO).all()):
        raise ValueError(f"et_int4_plain_mm: zero of the symmetric layout [N/32, 1] must be {SYMMETRIC_ZERO} in "
                         f"every entry, got values in [{int(zero.min())}, {int(zero.max())}]; re-export (pack_int4 "
                         f"writes it)")
    m, k = x2d.shape
    qdata, scale, zero = untile_weights(qdata, scale, zero)
    n = qdata.shape[0]
    blocks, groups = k // ACTIVATION_BLOCK, k // group_size
    zero = zero.expand(n, groups)  # one zero point per row applies to every group
    q, d = quantize_activation_blocks(x2d)
    qf = q.float().reshape(m, blocks, ACTIVATION_BLOCK)
    q_sum = qf.sum(dim=-1)                                  # [M, B], exact
    q_blocks = qf.permute(1, 2, 0)                          # [B, 32, M]
    z_blocks = zero.float().repeat_interleave(group_size // ACTIVATION_BLOCK, dim=1)  # [N, B]
    out = torch.empty(n, m, dtype=torch.float32, device=x2d.device)
    rows = max(1, _CHUNK_ELEMENTS // k)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        u = unpack_nibbles(qdata[start:stop]).float().reshape(stop - start, blocks, ACTIVATION_BLOCK)
        # Integers below 2**24 in magnitude: fp32 matmul gives the exact int32 block dots.
        dots = torch.bmm(u.transpose(0, 1), q_blocks).transpose(0, 1)          # [n, B, M]
        blk = (dots - z_blocks[start:stop, :, None] * q_sum.T) * d.T           # [n, B, M]
        per_group = blk.reshape(stop - start, groups, blocks // groups, m).sum(dim=2)  # [n, G, M]
        out[start:stop] = (per_group * scale[start:stop, :, None].float()).sum(dim=1)
    return out.T.to(torch.bfloat16).contiguous()
