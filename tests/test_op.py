"""torch.ops.et_int4.et_int4_plain_mm on CPU: registration, numerics and argument validation."""

from __future__ import annotations

import et_int4
import pytest
import torch
from et_int4 import pack_int4, w4a8_reference
from et_int4.backends.cuda.int4.packing import untile_weights
from et_int4.backends.cuda.int4.reference import check_w4a8_args
from torch._subclasses.fake_tensor import FakeTensorMode

OP = torch.ops.et_int4.et_int4_plain_mm.default


def _args(m: int = 3, k: int = 128, n: int = 64, group_size: int = 64, max_m: int = 4):
    qdata = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group_size) * 0.05 + 0.001).to(torch.bfloat16)
    zero_point = torch.randint(-8, 8, scale.shape, dtype=torch.int8)
    packed = pack_int4(qdata, scale, zero_point)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    return [x, packed.qdata, packed.scale, packed.zero, group_size, max_m]


def test_schema() -> None:
    assert str(OP._schema) == (
        "et_int4::et_int4_plain_mm(Tensor self, Tensor qdata, Tensor scale, Tensor zero, "
        "int group_size, int max_m) -> Tensor")


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("qdata_dtype", [torch.uint8, torch.int8])
def test_opcheck(m: int, qdata_dtype: torch.dtype) -> None:
    args = _args(m=m)
    args[1] = args[1].view(qdata_dtype)
    torch.library.opcheck(OP, tuple(args))


@pytest.mark.parametrize("m, max_m", [(1, 1), (3, 4), (8, 8)])
def test_cpu_is_the_reference(m: int, max_m: int) -> None:
    args = _args(m=m, max_m=max_m, k=256, group_size=128)
    y = OP(*args)
    assert (y.dtype, y.shape) == (torch.bfloat16, (m, 64))
    assert torch.equal(y, w4a8_reference(*args[:5]))


def test_strided_rows_give_the_result_of_dense_rows() -> None:
    # One half of h.chunk(2, -1): row stride 2K, as a model feeds it to a linear.
    args = _args(m=3)
    halves = torch.randn(3, 2 * 128, dtype=torch.bfloat16).chunk(2, -1)
    for half in halves:
        assert not half.is_contiguous()
        assert torch.equal(OP(half, *args[1:]), OP(half.contiguous(), *args[1:]))


@pytest.mark.parametrize("mode", ["cpu", "fake"])
def test_no_rows_give_an_empty_result(mode: str) -> None:
    # M = 0, as a dynamic M whose range starts at 0 reaches it: [0, N], not an error.
    args = _args(m=0)
    if mode == "fake":
        with FakeTensorMode() as fake_mode:
            y = OP(*[fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    else:
        y = OP(*args)
    assert (y.dtype, tuple(y.shape)) == (torch.bfloat16, (0, 64))


def test_fake_shape() -> None:
    args = _args(m=2)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = OP(*fake)
    assert (y.dtype, tuple(y.shape), y.device) == (torch.bfloat16, (2, 64), args[0].device)


def _replace(index: int, edit):
    def apply(args: list) -> list:
        args = list(args)
        args[index] = edit(args[index])
        return args
    return apply


def _row_major(args: list) -> list:
    """The same weights in et-int4 0.1's row-major layout: qdata [N, K/2], scale and zero [N, K/gs]."""
    return [args[0], *untile_weights(*args[1:4]), *args[4:]]


# (argument the message must name, edit of valid arguments, pattern the message must match);
# valid arguments: M=3, K=128, N=64 (2 tiles), group_size=64, max_m=4.
BAD_ARGS = {
    "self-dtype": ("self", _replace(0, lambda t: t.half()), "bfloat16.*torch.float16"),
    "self-rank": ("self", _replace(0, lambda t: t[None]), r"2-D.*\(1, 3, 128\)"),
    "k-zero": ("self", _replace(0, lambda t: t[:, :0]), "K >= 32.*K=0"),
    "k-below-block": ("self", _replace(0, lambda t: t[:, :16]), "K >= 32.*K=16"),
    "qdata-dtype": ("qdata", _replace(1, lambda t: t.to(torch.int32)), "uint8.*torch.int32"),
    "qdata-rank": ("qdata", _replace(1, lambda t: t.flatten()), r"2-D.*\(4096,\)"),
    "qdata-shape": ("qdata", _replace(1, lambda t: t[:, :1024]), r"\[N/32, 2048\].*\(2, 1024\)"),
    "qdata-no-tiles": ("qdata", _replace(1, lambda t: t[:0]), r"N >= 32.*\(0, 2048\)"),
    "qdata-row-major": ("qdata", lambda args: [args[0], _row_major(args)[1], *args[2:]],
                        r"\(64, 64\).*row-major.*re-export"),
    "all-row-major": ("qdata", _row_major, r"\(64, 64\).*row-major.*re-export"),
    "scale-dtype": ("scale", _replace(2, lambda t: t.float()), "bfloat16.*torch.float32"),
    "scale-shape": ("scale", _replace(2, lambda t: t[:1]), r"\[2, 64\].*\(1, 64\)"),
    "zero-dtype": ("zero", _replace(3, lambda t: t.to(torch.uint8)), "int8.*torch.uint8"),
    "zero-shape": ("zero", _replace(3, lambda t: t[:, :16]), r"\[2, 64\].*\(2, 16\)"),
    "group-size-multiple": ("group_size", _replace(4, lambda g: 48), "multiple of 32.*48"),
    "group-size-divides": ("group_size", _replace(4, lambda g: 96), "divides K=128, got 96"),
    "m-above-max": ("M", _replace(5, lambda g: 2), "M <= max_m=2.*M=3"),
    "max-m-above-shim": ("max_m", _replace(5, lambda g: et_int4.SHIM_GEMM_MAX_M + 1),
                         "exceeds SHIM_GEMM_MAX_M"),
    "max-m-zero": ("max_m", _replace(5, lambda g: 0), "at least 1"),
}


@pytest.mark.parametrize("name, edit, pattern", BAD_ARGS.values(), ids=BAD_ARGS.keys())
@pytest.mark.parametrize("mode", ["cpu", "fake"])
def test_validation(name: str, edit, pattern: str, mode: str) -> None:
    args = edit(_args())
    with pytest.raises(ValueError, match=pattern) as info:
        if mode == "fake":
            with FakeTensorMode() as fake_mode:
                OP(*[fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        else:
            OP(*args)
    assert name in str(info.value)


def test_row_limit_is_a_dispatch_limit_error() -> None:
    args = _args(m=5, max_m=4)
    with pytest.raises(et_int4.DispatchLimitError):
        OP(*args)


@pytest.mark.parametrize("k", [0, 16, 31])
def test_k_below_one_block_is_a_clear_error(k: int) -> None:
    # Not a ZeroDivisionError or a reshape error from deep inside: the check names self and K.
    x = torch.randn(2, k, dtype=torch.bfloat16)
    qdata = torch.zeros(1, 16 * k, dtype=torch.uint8)
    scale, zero = torch.ones(1, 32, dtype=torch.bfloat16), torch.zeros(1, 32, dtype=torch.int8)
    for call in (lambda: check_w4a8_args(x, qdata, scale, zero, 32, 4),
                 lambda: w4a8_reference(x, qdata, scale, zero, 32),
                 lambda: OP(x, qdata, scale, zero, 32, 4)):
        with pytest.raises(ValueError, match=rf"self must be \[M, K\] with K >= 32, got K={k}$"):
            call()
