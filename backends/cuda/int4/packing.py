"""The op's weight format: torchao's int4 weights as 4-bit values, tiled in the order the kernel reads.

torchao's ``IntxUnpackedToInt8Tensor`` keeps each int4 value q in [-8, 7] in its own int8 and a
zero point in the same domain. The kernels read unsigned nibbles u = q + 8 in [0, 15], two per byte
(low nibble = even k), with the zero point moved to the same +8 domain.

Tiled layout (``backends/cuda/int4/int4_mm.h`` is the other description of it): rows come in tiles
of ``TILE_ROWS`` = 32 and k in blocks of ``ACTIVATION_BLOCK`` = 32. For each tile and block, lane
``l = 4g + t`` of a warp loads 16 bytes: the 32-bit words (8 nibbles, k = 8t .. 8t+7 of the block)
of rows g, g+8, g+16 and g+24, which are exactly its mma A fragments: no shuffle at run time.
Scales and zero points follow per tile and group: rows g, g+8, g+16, g+24 at positions 4g .. 4g+3.
Where every row has one zero point for all its groups, zero holds just that one, tiled as a single
group: the kernels then load it once instead of once per group (about a tenth of their time at group
size 32). Symmetric weights (torchao's default: every zero point 0, i.e. 8 in the +8 domain) store
one 8 per tile: the kernels then compute with no zero-point term at all (3-5% faster on 4096 x 4096,
bench/RESULTS.md).

    qdata [N/32, K/32 * 512] uint8     scale [N/32, K/group_size * 32] bf16
    zero  [N/32, K/group_size * 32] int8 (per group), [N/32, 32] (one per row) or [N/32, 1] (symmetric)
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "ACTIVATION_BLOCK",
    "TILE_BLOCK_BYTES",
    "TILE_ROWS",
    "SYMMETRIC_ZERO",
    "PackedInt4",
    "check_group_size",
    "is_symmetric",
    "pack_int4",
    "pack_torchao_weight",
    "symmetric_zero",
    "tile_weights",
    "unpack_int4",
    "unpack_nibbles",
    "unpack_tiled",
    "untile_weights",
]

_aten = torch.ops.aten
INT4_MIN, INT4_MAX = -8, 7
_OFFSET = 8  # q + 8 maps [-8, 7] onto the unsigned nibble range [0, 15]
SYMMETRIC_ZERO = _OFFSET  # every entry of symmetric weights' zero tensor: zero point 0 (C++: kSymmetricZero)
# Scales of the symmetric layout stay below this in magnitude: its kernels form s * 1.5 * 2^19 in fp32.
_SYMMETRIC_MAX_SCALE = 2.0**100
# The kernels quantize activations in blocks of 32 (C++: kBlockK) and need whole blocks per group.
ACTIVATION_BLOCK = 32
TILE_ROWS = 32  # weight rows per tile: N must be a multiple
_WORDS = 4  # the 32-bit words a lane loads per tile and block
_WORD_BYTES = 4
_QUADS = TILE_ROWS // _WORDS  # g: lanes 4g .. 4g+3 share rows g, g+8, g+16, g+24
TILE_BLOCK_BYTES = TILE_ROWS * ACTIVATION_BLOCK // 2  # one tile x one block of nibbles: 16 bytes a lane


@dataclasses.dataclass(frozen=True, eq=False)
class PackedInt4:
    """An int4 weight [N, K] in the op's format.

    Attributes:
        qdata: uint8 [N/32, 16*K], u = q + 8, tiled (see the module docstring).
        scale: bfloat16 [N/32, 32*K/group_size], tiled.
        zero: int8 [N/32, 32*K/group_size], zero point + 8, in [0, 15], tiled; or [N/32, 32] where
            each row has one zero point for all its groups; or [N/32, 1], 8 in every entry, for
            symmetric weights (see the module docstring).
        group_size: columns per scale/zero group, a multiple of 32 that divides K.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's logical shape (N, K)."""
        return weight_shape(self.qdata)


def weight_shape(qdata: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a tiled qdata."""
    return qdata.shape[0] * TILE_ROWS, qdata.shape[1] // TILE_BLOCK_BYTES * ACTIVATION_BLOCK


def check_group_size(group_size: object, k: int) -> None:
    """The group-size rule, for every Python caller: a multiple of ``ACTIVATION_BLOCK`` that divides K.

    Raises ValueError that starts with ``group_size``; callers add where the value came from.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < ACTIVATION_BLOCK \
            or group_size % ACTIVATION_BLOCK or k % group_size:
        raise ValueError(
            f"group_size must be a multiple of {ACTIVATION_BLOCK} (the kernels' activation block) that "
            f"divides K={k}, got {group_size!r}"
        )


def _check_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}] (int4), got values in [{int(t.min())}, {int(t.max())}]"
        )


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def pack_int4(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> PackedInt4:
    """Pack torchao's unpacked int4 weight data into the op's format.

    Args:
        qdata: int8 [N, K], values in [-8, 7].
        scale: bfloat16 [N, K/group_size].
        zero_point: int8 [N, K/group_size], values in [-8, 7] (all zeros when symmetric).
    """
    _check_dtype("qdata", qdata, torch.int8)
    _check_dtype("scale", scale, torch.bfloat16)
    _check_dtype("zero_point", zero_point, torch.int8)
    if qdata.dim() != 2:
        raise ValueError(f"qdata must be 2-D [N, K], got shape {tuple(qdata.shape)}")
    n, k = qdata.shape
    if scale.dim() != 2 or scale.shape[0] != n or scale.shape[1] == 0 or k % scale.shape[1]:
        raise ValueError(
            f"scale must be 2-D [N={n}, K/group_size] with K={k} a multiple of its column count, "
            f"got shape {tuple(scale.shape)}"
        )
    if zero_point.shape != scale.shape:
        raise ValueError(
            f"zero_point must have the shape of scale {tuple(scale.shape)}, got {tuple(zero_point.shape)}"
        )
    group_size = k // scale.shape[1]
    try:
        check_group_size(group_size, k)
    except ValueError as error:
        raise ValueError(
            f"{error} ({scale.shape[1]} groups per row); quantize with PerGroup({ACTIVATION_BLOCK}) or "
            f"another multiple of {ACTIVATION_BLOCK}"
        ) from None
    if n % TILE_ROWS:
        raise ValueError(
            f"the kernels take weights in tiles of {TILE_ROWS} output rows, got N={n} rows; pad the "
            f"layer to a multiple of {TILE_ROWS} or leave it as dequantize + linear"
        )
    _check_range("qdata", qdata, INT4_MIN, INT4_MAX)
    # torchao's int4 zero points share qdata's range, so zero_point + 8 is a nibble like u.
    _check_range("zero_point", zero_point, INT4_MIN, INT4_MAX)
    u = (qdata.to(torch.int16) + _OFFSET).to(torch.uint8)
    rows = u[:, 0::2] | (u[:, 1::2] << 4)
    symmetric = not bool(zero_point.any()) and bool((scale.float().abs() < _SYMMETRIC_MAX_SCALE).all())
    if bool((zero_point == zero_point[:, :1]).all()):
        zero_point = zero_point[:, :1]  # one per row: the kernels read it once, not per group
    tiled_q, tiled_s, tiled_z = tile_weights(rows, scale, zero_point + _OFFSET)
    return PackedInt4(tiled_q, tiled_s, symmetric_zero(n, qdata.device) if symmetric else tiled_z,
                      group_size=group_size)


def symmetric_zero(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The zero tensor of symmetric weights with N rows: int8 [N/32, 1], 8 in every entry."""
    return torch.full((n // TILE_ROWS, 1), SYMMETRIC_ZERO, dtype=torch.int8, device=device)


def is_symmetric(zero: torch.Tensor) -> bool:
    """Whether a tiled zero tensor declares symmetric weights (by its shape, as the kernels tell)."""
    return zero.dim() == 2 and zero.shape[1] == 1


def tile_weights(qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-major nibbles uint8 [N, K/2] (low nibble = even k), scale [N, G] and zero [N, G] (or
    [N, 1], one per row) -> tiled layout."""
    n, half_k = qdata.shape
    if (n % TILE_ROWS or (2 * half_k) % ACTIVATION_BLOCK or scale.shape[0] != n or zero.shape[0] != n
            or zero.shape[1] not in (scale.shape[1], 1)):
        raise ValueError(
            f"tile_weights takes qdata [N, K/2] with N a multiple of {TILE_ROWS} and K of "
            f"{ACTIVATION_BLOCK}, scale [N, K/group_size] and zero of scale's shape or [N, 1]; got qdata "
            f"{tuple(qdata.shape)}, scale {tuple(scale.shape)}, zero {tuple(zero.shape)}"
        )
    tiles, blocks = n // TILE_ROWS, 2 * half_k // ACTIVATION_BLOCK
    # words[row, 4b + t] with row = 32T + 8i + g  ->  [T][b][g][t][i]
    words = qdata.contiguous().view(torch.int32).reshape(tiles, _WORDS, _QUADS, blocks, _WORDS)
    tiled = words.permute(0, 3, 2, 4, 1).contiguous().view(torch.uint8).reshape(tiles, -1)
    return tiled, _tile_groups(scale), _tile_groups(zero)


def _tile_groups(t: torch.Tensor) -> torch.Tensor:
    n, groups = t.shape
    return t.reshape(n // TILE_ROWS, _WORDS, _QUADS, groups).permute(0, 3, 2, 1).reshape(n // TILE_ROWS, -1)


def _untile_groups(t: torch.Tensor) -> torch.Tensor:
    tiles = t.shape[0]
    grouped = t.reshape(tiles, -1, _QUADS, _WORDS)
    return grouped.permute(0, 3, 2, 1).reshape(tiles * TILE_ROWS, grouped.shape[1])


def untile_weights(qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact inverse of :func:`tile_weights`: row-major nibbles [N, K/2] (qdata's dtype), scale
    [N, G] and zero [N, G] (or [N, 1] where it was given one per row, or symmetric weights' [N/32, 1])."""
    n, k = weight_shape(qdata)
    blocks = k // ACTIVATION_BLOCK
    # Bytes, not 32-bit words: reshapes and permutes of one byte dtype are plain ops for every
    # compiler the pass's graph meets (a dtype view is not), and reshape takes any strides.
    tiled = qdata.reshape(-1, blocks, _QUADS, _WORDS, _WORDS, _WORD_BYTES)
    rows = tiled.permute(0, 4, 2, 1, 3, 5).reshape(n, k // 2)
    zero = zero.expand(-1, TILE_ROWS).reshape(n, 1) if is_symmetric(zero) else _untile_groups(zero)
    return rows, _untile_groups(scale), zero


def unpack_nibbles(qdata: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values u in [0, 15] from row-major uint8 (or int8) [N, K/2], low nibble = even k."""
    packed = qdata if qdata.dtype == torch.uint8 else qdata.view(torch.uint8)
    # A floor division, not >> 4: a right shift is no Core ATen op (unpack_tiled runs in graphs
    # that ExecuTorch's edge dialect checks). _aten's Scalar overloads: see unpack_tiled.
    high = _aten.div.Scalar_mode(packed, 16, rounding_mode="floor")
    return torch.stack((packed & 0xF, high), dim=-1).flatten(-2)


def unpack_tiled(qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchao's ``(qdata int8 [N, K], scale [N, G], zero_point int8 [N, G])`` from the op's tiled
    uint8 qdata, scale and zero.

    Traceable: only reshapes, permutes and elementwise ops on uint8/int8, so
    ``rewrite_int4_linears`` emits exactly this into a graph to feed ``dequantize_affine`` from the
    packed buffers (prefill), and :func:`unpack_int4` calls it on tensors.
    """
    rows, scale, zero = untile_weights(qdata, scale, zero)
    # The Scalar overloads, named: ``t - 8`` traces to sub.Tensor, whose number ExecuTorch's edge
    # lowering lifts into a tensor constant named by a per-program counter
    # (``_lifted_tensor_constant<i>``), and its CUDA backend shares constants across methods by name.
    qdata = _aten.sub.Scalar(unpack_nibbles(rows).to(torch.int8), _OFFSET)
    return qdata, scale, _aten.sub.Scalar(zero, _OFFSET).expand_as(scale).contiguous()


def unpack_int4(packed: PackedInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact inverse of :func:`pack_int4`: ``(qdata int8 [N, K], scale, zero_point int8)``."""
    return unpack_tiled(packed.qdata, packed.scale, packed.zero)


def pack_torchao_weight(weight: torch.Tensor) -> PackedInt4:
    """Pack a torchao ``IntxUnpackedToInt8Tensor`` int4 weight (``IntxWeightOnlyConfig``, ``PerGroup``)."""
    for attr in ("qdata", "scale", "zero_point", "block_size"):
        if not hasattr(weight, attr):
            raise ValueError(
                f"weight must be a torchao IntxUnpackedToInt8Tensor (quantize_ with "
                f"IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(gs))), "
                f"got {type(weight).__name__} without .{attr}"
            )
    qdata, scale = weight.qdata, weight.scale
    block_size = tuple(weight.block_size)
    if qdata.dim() != 2 or scale.dim() != 2 or block_size != (1, qdata.shape[1] // scale.shape[1]):
        raise ValueError(
            f"weight must be quantized per group along K (block_size (1, group_size)), got "
            f"block_size {block_size} for qdata {tuple(qdata.shape)} and scale {tuple(scale.shape)}"
        )
    return pack_int4(qdata, scale, weight.zero_point)
