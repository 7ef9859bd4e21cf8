"""The op's weight format: torchao's unpacked int4 weights as two 4-bit values per byte.

torchao's ``IntxUnpackedToInt8Tensor`` keeps each int4 value q in [-8, 7] in its own int8 and a
zero point in the same domain. The kernels read unsigned nibbles u = q + 8 in [0, 15], two per byte
(low nibble = even k), with the zero point moved to the same +8 domain.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["PackedInt4", "pack_int4", "pack_torchao_weight", "unpack_int4", "unpack_nibbles"]

INT4_MIN, INT4_MAX = -8, 7
_OFFSET = 8  # q + 8 maps [-8, 7] onto the unsigned nibble range [0, 15]
# The kernels quantize activations in blocks of 32 and need whole blocks per weight group.
GROUP_MULTIPLE = 32


@dataclasses.dataclass(frozen=True, eq=False)
class PackedInt4:
    """An int4 weight [N, K] in the op's format.

    Attributes:
        qdata: uint8 [N, K/2], u = q + 8, low nibble = even k.
        scale: bfloat16 [N, K/group_size].
        zero: int8 [N, K/group_size], zero point + 8, in [0, 15].
        group_size: columns per scale/zero group, a multiple of 32 that divides K.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's logical shape (N, K)."""
        return self.qdata.shape[0], self.qdata.shape[1] * 2


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
    if group_size % GROUP_MULTIPLE:
        raise ValueError(
            f"group_size must be a multiple of {GROUP_MULTIPLE} (the kernels' activation block), "
            f"got {group_size} (K={k}, {scale.shape[1]} groups per row); quantize with "
            f"PerGroup({GROUP_MULTIPLE}) or another multiple of {GROUP_MULTIPLE}"
        )
    _check_range("qdata", qdata, INT4_MIN, INT4_MAX)
    # torchao's int4 zero points share qdata's range, so zero_point + 8 is a nibble like u.
    _check_range("zero_point", zero_point, INT4_MIN, INT4_MAX)
    u = (qdata.to(torch.int16) + _OFFSET).to(torch.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    return PackedInt4(
        qdata=packed.contiguous(),
        scale=scale.contiguous(),
        zero=(zero_point + _OFFSET).contiguous(),
        group_size=group_size,
    )


def unpack_nibbles(qdata: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values u in [0, 15] from packed uint8 (or int8) [N, K/2], low nibble = even k."""
    packed = qdata.view(torch.uint8)
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def unpack_int4(packed: PackedInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact inverse of :func:`pack_int4`: ``(qdata int8 [N, K], scale, zero_point int8)``."""
    qdata = unpack_nibbles(packed.qdata).to(torch.int8) - _OFFSET
    return qdata, packed.scale, packed.zero - _OFFSET


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
