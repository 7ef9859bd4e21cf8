"""pack_int4 / unpack_int4: the op's nibble format, its exact inverse, and what it refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from et_int4 import PackedInt4, pack_int4, unpack_int4
from et_int4.backends.cuda.int4.packing import pack_torchao_weight
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


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 24), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]),
       asymmetric=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_round_trip(n: int, groups: int, group_size: int, asymmetric: bool, seed: int) -> None:
    k = groups * group_size
    qdata, scale, zero_point = _weights(n, k, group_size, asymmetric, seed)
    packed = pack_int4(qdata, scale, zero_point)
    assert packed.group_size == group_size
    assert packed.shape == (n, k)
    assert (packed.qdata.dtype, packed.qdata.shape) == (torch.uint8, (n, k // 2))
    assert (packed.zero.dtype, packed.zero.shape) == (torch.int8, (n, groups))
    assert packed.scale.dtype == torch.bfloat16
    # Low nibble = even k, value q + 8; zero point in the same +8 domain.
    assert torch.equal((packed.qdata & 0xF).to(torch.int8) - 8, qdata[:, 0::2])
    assert torch.equal((packed.qdata >> 4).to(torch.int8) - 8, qdata[:, 1::2])
    assert torch.equal(packed.zero, zero_point + 8)
    assert int(packed.zero.min()) >= 0 and int(packed.zero.max()) <= 15
    q, s, z = unpack_int4(packed)
    assert q.dtype == torch.int8 and z.dtype == torch.int8
    assert torch.equal(q, qdata) and torch.equal(s, scale) and torch.equal(z, zero_point)


def test_int8_view_unpacks_the_same() -> None:
    packed = pack_int4(*_weights(8, 128, 64, asymmetric=True))
    as_int8 = dataclasses.replace(packed, qdata=packed.qdata.view(torch.int8))
    assert all(torch.equal(a, b) for a, b in zip(unpack_int4(as_int8), unpack_int4(packed)))


def test_packed_is_frozen() -> None:
    packed = pack_int4(*_weights(2, 32, 32, asymmetric=False))
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
    qdata, scale, zero_point = _weights(4, 128, 64, asymmetric=True)
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
    ({"qdata": lambda t: t.reshape(2, 2, 128)}, "qdata", r"2-D.*\(2, 2, 128\)"),
    ({"scale": lambda t: t[:3]}, "scale", r"N=4.*\(3, 2\)"),
    ({"scale": lambda t: torch.cat([t, t[:, :1]], 1)}, "scale", r"K=128.*\(4, 3\)"),
    ({"zero_point": lambda t: t[:, :1]}, "zero_point", r"\(4, 2\).*\(4, 1\)"),
    ({"scale": lambda t: t.repeat(1, 4), "zero_point": lambda t: t.repeat(1, 4)},
     "group_size", "multiple of 32.*got 16"),
])
def test_rejects(overrides: dict, name: str, pattern: str) -> None:
    args = _bad(**overrides)
    with pytest.raises(ValueError, match=pattern) as info:
        pack_int4(**args)
    assert str(info.value).startswith(name)
