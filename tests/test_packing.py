"""pack_int4 / unpack_int4 and tile_weights / untile_weights: the op's tiled nibble format, its
exact inverses, and what pack_int4 refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from et_int4 import PackedInt4, pack_int4, unpack_int4
from et_int4.backends.cuda.int4.packing import (
    TILE_ROWS,
    pack_torchao_weight,
    tile_weights,
    untile_weights,
    weight_shape,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from models import MLP, quantized


def _weights(n: int, k: int, group_size: int, asymmetric: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qdata = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    scale = (torch.rand(n, k // group_size, generator=gen) + 0.01).to(torch.bfloat16)
    if asymmetric:
        zero_point = torch.randint(-8, 8, scale.shape, dtype=torch.int8, generator=gen)
    else:
        zero_point = torch.zeros(scale.shape, dtype=torch.int8)
    return qdata, scale, zero_point


def _row_major_nibbles(qdata: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] from int8 [N, K] in [-8, 7]: u = q + 8, low nibble = even k (et-int4 0.1's format)."""
    u = (qdata.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


@settings(max_examples=60, deadline=None)
@given(tiles=st.integers(1, 3), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]),
       asymmetric=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_round_trip(tiles: int, groups: int, group_size: int, asymmetric: bool, seed: int) -> None:
    n, k = tiles * TILE_ROWS, groups * group_size
    qdata, scale, zero_point = _weights(n, k, group_size, asymmetric, seed)
    packed = pack_int4(qdata, scale, zero_point)
    assert packed.group_size == group_size
    assert packed.shape == (n, k) and weight_shape(packed.qdata) == (n, k)
    assert (packed.qdata.dtype, packed.qdata.shape) == (torch.uint8, (tiles, 16 * k))
    assert (packed.scale.dtype, packed.scale.shape) == (torch.bfloat16, (tiles, 32 * groups))
    # Symmetric weights: one 8 per tile. Else one zero point per row where a row has no other, else one
    # per group.
    per_row = bool((zero_point == zero_point[:, :1]).all())
    assert per_row or asymmetric
    width = 1 if not asymmetric else 32 * (1 if per_row else groups)
    assert (packed.zero.dtype, packed.zero.shape) == (torch.int8, (tiles, width))
    # Low nibble = even k, value q + 8; zero point in the same +8 domain; then tiled.
    expected = tile_weights(_row_major_nibbles(qdata), scale, (zero_point[:, :1] if per_row else zero_point) + 8)
    assert torch.equal(packed.qdata, expected[0]) and torch.equal(packed.scale, expected[1])
    assert torch.equal(packed.zero, expected[2] if asymmetric else torch.full((tiles, 1), 8, dtype=torch.int8))
    assert int(packed.zero.min()) >= 0 and int(packed.zero.max()) <= 15
    q, s, z = unpack_int4(packed)
    assert q.dtype == torch.int8 and z.dtype == torch.int8
    assert torch.equal(q, qdata) and torch.equal(s, scale) and torch.equal(z, zero_point)


@settings(max_examples=40, deadline=None)
@given(tiles=st.integers(1, 4), blocks=st.integers(1, 6), groups=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_tile_untile_round_trip_is_exact(tiles: int, blocks: int, groups: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, k = tiles * TILE_ROWS, blocks * 32
    rows = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    # Any bit pattern, NaNs included, must come back bit for bit.
    scale = torch.randint(-2**15, 2**15, (n, groups), dtype=torch.int16, generator=gen).view(torch.bfloat16)
    zero = torch.randint(-128, 128, (n, groups), dtype=torch.int8, generator=gen)
    tiled = tile_weights(rows, scale, zero)
    assert [(t.dtype, tuple(t.shape)) for t in tiled] == [
        (torch.uint8, (tiles, 16 * k)), (torch.bfloat16, (tiles, 32 * groups)), (torch.int8, (tiles, 32 * groups))]
    assert weight_shape(tiled[0]) == (n, k)
    back = untile_weights(*tiled)
    assert [(t.dtype, tuple(t.shape)) for t in back] == [
        (torch.uint8, (n, k // 2)), (torch.bfloat16, (n, groups)), (torch.int8, (n, groups))]
    assert torch.equal(back[0], rows) and torch.equal(back[2], zero)
    assert torch.equal(back[1].view(torch.int16), scale.view(torch.int16))
    # And the other way: untile is a bijection, so tiling what it gives back is the identity too.
    again = tile_weights(*back)
    assert torch.equal(again[0], tiled[0]) and torch.equal(again[2], tiled[2])
    assert torch.equal(again[1].view(torch.int16), tiled[1].view(torch.int16))


def test_tiled_lane_layout_by_brute_force() -> None:
    """The layout int4_mm.h documents, element by element: for tile T, block b and lane l = 4g + t,
    word i of the lane's 16 bytes is row-major word 4b + t (k = 32b + 8t .. 32b + 8t + 7) of row
    32T + 8i + g; scales and zeros of group c at 32c + 4g + i."""
    gen = torch.Generator().manual_seed(7)
    tiles, blocks, groups = 2, 3, 3
    n, k = tiles * TILE_ROWS, blocks * 32
    rows = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scale = torch.randn(n, groups, generator=gen).to(torch.bfloat16)
    zero = torch.randint(0, 16, (n, groups), dtype=torch.int8, generator=gen)
    qdata, tiled_scale, tiled_zero = tile_weights(rows, scale, zero)
    checked = 0
    for tile in range(tiles):
        for b in range(blocks):
            for lane in range(32):
                g, t = divmod(lane, 4)
                record = qdata[tile, b * 512 + lane * 16: b * 512 + (lane + 1) * 16]
                for i in range(4):
                    row, word = 32 * tile + 8 * i + g, 4 * b + t
                    assert record[4 * i: 4 * i + 4].tolist() == rows[row, 4 * word: 4 * word + 4].tolist(), \
                        (tile, b, lane, i)
                    checked += 4
        for c in range(groups):
            for g in range(8):
                for i in range(4):
                    row = 32 * tile + 8 * i + g
                    assert tiled_scale[tile, 32 * c + 4 * g + i].item() == scale[row, c].item()
                    assert tiled_zero[tile, 32 * c + 4 * g + i].item() == zero[row, c].item()
    assert checked == qdata.numel() == rows.numel()  # every byte, once


@pytest.mark.parametrize("n", [1, 8, 24, 33, 48, 100])
def test_pack_refuses_n_off_the_tiles(n: int) -> None:
    with pytest.raises(ValueError, match=rf"tiles of {TILE_ROWS} output rows, got N={n} rows") as info:
        pack_int4(*_weights(n, 64, 32, asymmetric=True))
    assert "dequantize + linear" in str(info.value)


def test_int8_view_unpacks_the_same() -> None:
    packed = pack_int4(*_weights(32, 128, 64, asymmetric=True))
    as_int8 = dataclasses.replace(packed, qdata=packed.qdata.view(torch.int8))
    assert all(torch.equal(a, b) for a, b in zip(unpack_int4(as_int8), unpack_int4(packed)))


def test_one_tile_with_any_stride_on_its_size_1_dimension_unpacks_the_same() -> None:
    # A [1, L] tensor is contiguous whatever its first stride, e.g. a transposed [L, 1] one.
    packed = pack_int4(*_weights(32, 128, 64, asymmetric=True))
    odd = packed.qdata.flatten()[:, None].clone().t()
    assert odd.is_contiguous() and odd.stride() == (1, 1)
    as_odd = dataclasses.replace(packed, qdata=odd)
    assert all(torch.equal(a, b) for a, b in zip(unpack_int4(as_odd), unpack_int4(packed)))


def test_zero_points_per_row_are_stored_once_and_read_back_per_group() -> None:
    qdata, scale, _ = _weights(64, 256, 32, asymmetric=False)
    zero_point = torch.randint(-8, 8, (64, 1), dtype=torch.int8).expand(64, 8).contiguous()
    packed = pack_int4(qdata, scale, zero_point)
    assert packed.zero.shape == (2, 32)
    assert torch.equal(unpack_int4(packed)[2], zero_point)
    zero_point[5, 3] += 1 if zero_point[5, 3] < 7 else -1  # one group differs: back to one per group
    assert pack_int4(qdata, scale, zero_point).zero.shape == (2, 256)


def test_symmetric_weights_store_one_8_per_tile_unless_a_scale_reaches_2_to_the_100() -> None:
    qdata, scale, zero_point = _weights(64, 256, 64, asymmetric=False)
    packed = pack_int4(qdata, scale, zero_point)
    assert torch.equal(packed.zero, torch.full((2, 1), 8, dtype=torch.int8))
    assert all(torch.equal(a, b) for a, b in zip(unpack_int4(packed), (qdata, scale, zero_point)))
    # The symmetric kernels form s * 1.5 * 2^19 in fp32: such scales keep one zero point per row instead.
    scale[37, 2] = -(2.0**100)
    packed = pack_int4(qdata, scale, zero_point)
    assert torch.equal(packed.zero, torch.full((2, 32), 8, dtype=torch.int8))
    assert all(torch.equal(a, b) for a, b in zip(unpack_int4(packed), (qdata, scale, zero_point)))


def test_packed_is_frozen() -> None:
    packed = pack_int4(*_weights(32, 32, 32, asymmetric=False))
    assert isinstance(packed, PackedInt4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        packed.group_size = 64


@pytest.mark.parametrize("asymmetric", [False, True])
def test_pack_torchao_weight(asymmetric: bool) -> None:
    weight = quantized(MLP(), group_size=32, asymmetric=asymmetric).up_proj.weight
    packed = pack_torchao_weight(weight)
    q, s, z = unpack_int4(packed)
    assert packed.group_size == 32
    assert torch.equal(q, weight.qdata) and torch.equal(s, weight.scale)
    assert torch.equal(z, weight.zero_point)
    assert bool(z.any()) == asymmetric


def test_pack_torchao_weight_rejects_plain_tensor() -> None:
    with pytest.raises(ValueError, match="IntxUnpackedToInt8Tensor"):
        pack_torchao_weight(torch.randn(4, 64))


def _bad(**overrides):
    qdata, scale, zero_point = _weights(32, 128, 64, asymmetric=True)
    args = {"qdata": qdata, "scale": scale, "zero_point": zero_point}
    args.update({k: (v(args[k]) if callable(v) else v) for k, v in overrides.items()})
    return args


def _set(index, value):
    def edit(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t
    return edit


@pytest.mark.parametrize("overrides, name, pattern", [
    ({"qdata": _set((1, 3), 8)}, "qdata", r"\[-8, 7\].*got values in \[-?\d+, 8\]"),
    ({"qdata": _set((0, 0), -9)}, "qdata", r"\[-8, 7\].*got values in \[-9, "),
    ({"zero_point": _set((2, 1), 8)}, "zero_point", r"\[-8, 7\].*got values in \[-?\d+, 8\]"),
    ({"zero_point": _set((0, 0), -9)}, "zero_point", r"\[-8, 7\].*got values in \[-9, "),
    ({"qdata": lambda t: t.to(torch.int16)}, "qdata", "torch.int8.*torch.int16"),
    ({"qdata": lambda t: t.to(torch.uint8)}, "qdata", "torch.int8.*torch.uint8"),
    ({"scale": lambda t: t.float()}, "scale", "torch.bfloat16.*torch.float32"),
    ({"zero_point": lambda t: t.to(torch.bfloat16)}, "zero_point", "torch.int8.*torch.bfloat16"),
    ({"qdata": lambda t: t.reshape(2, 16, 128)}, "qdata", r"2-D.*\(2, 16, 128\)"),
    ({"scale": lambda t: t[:3]}, "scale", r"N=32.*\(3, 2\)"),
    ({"scale": lambda t: torch.cat([t, t[:, :1]], 1)}, "scale", r"K=128.*\(32, 3\)"),
    ({"zero_point": lambda t: t[:, :1]}, "zero_point", r"\(32, 2\).*\(32, 1\)"),
    ({"scale": lambda t: t.repeat(1, 4), "zero_point": lambda t: t.repeat(1, 4)},
     "group_size", "multiple of 32.*got 16"),
])
def test_rejects(overrides: dict, name: str, pattern: str) -> None:
    args = _bad(**overrides)
    with pytest.raises(ValueError, match=pattern) as info:
        pack_int4(**args)
    assert str(info.value).startswith(name)
