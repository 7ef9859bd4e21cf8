"""MATVEC_MAX_M (export time) against SHIM_GEMM_MAX_M (build time): values, scoping, and the pass's
routing decisions at and around the limit. How SHIM_GEMM_MAX_M gets from CMake into the library and
Python is tested in test_shim_abi.py."""

from __future__ import annotations

import math

import et_int4
import pytest
import torch
from et_int4 import runtime
from models import mlp_program
from torch.export import Dim

OP = torch.ops.et_int4.et_int4_plain_mm.default
LIMITS = [4, 8]


def _op_count(ep: torch.export.ExportedProgram) -> int:
    return sum(n.target == OP for n in ep.graph.nodes)


def test_default_is_four() -> None:
    assert et_int4.DEFAULT_MATVEC_MAX_M == 4
    assert et_int4.get_matvec_max_m() == 4


def test_context_manager_sets_and_restores() -> None:
    with et_int4.matvec_max_m(2) as value:
        assert value == 2
        assert et_int4.get_matvec_max_m() == 2
    assert et_int4.get_matvec_max_m() == 4


def test_context_manager_restores_on_error() -> None:
    with pytest.raises(KeyError):
        with et_int4.matvec_max_m(1):
            raise KeyError("boom")
    assert et_int4.get_matvec_max_m() == 4


def test_context_manager_nests() -> None:
    with et_int4.matvec_max_m(8):
        with et_int4.matvec_max_m(1):
            assert et_int4.get_matvec_max_m() == 1
        assert et_int4.get_matvec_max_m() == 8
    assert et_int4.get_matvec_max_m() == 4


@pytest.mark.parametrize("bad", [0, -1, "shim+1", 4.0, "4", True, None])
def test_violations_raise(bad: object) -> None:
    if bad == "shim+1":
        bad = et_int4.SHIM_GEMM_MAX_M + 1
    # Raised when called, before any block runs.
    with pytest.raises(et_int4.DispatchLimitError, match="SHIM_GEMM_MAX_M") as info:
        et_int4.matvec_max_m(bad)
    assert isinstance(info.value, ValueError)
    assert "MATVEC_MAX_M" in str(info.value)
    assert et_int4.get_matvec_max_m() == 4


def test_too_large_names_the_rebuild() -> None:
    n = et_int4.SHIM_GEMM_MAX_M + 1
    with pytest.raises(et_int4.DispatchLimitError, match=f"ET_INT4_SHIM_GEMM_MAX_M={n}"):
        et_int4.matvec_max_m(n)


def test_beyond_any_build_names_no_rebuild() -> None:
    # CMake refuses ET_INT4_SHIM_GEMM_MAX_M above the bound: no message may suggest such a build.
    bound = runtime.shim_gemm_max_m_bound()
    with pytest.raises(et_int4.DispatchLimitError, match=f"no build handles more than {bound} rows") as info:
        et_int4.matvec_max_m(bound + 1)
    assert "rebuild" not in str(info.value)
    for n in range(et_int4.SHIM_GEMM_MAX_M + 1, bound + 1):
        with pytest.raises(et_int4.DispatchLimitError, match=f"rebuild with `ET_INT4_SHIM_GEMM_MAX_M={n} "):
            et_int4.matvec_max_m(n)


def test_dispatch_limit_error_is_value_error() -> None:
    assert issubclass(et_int4.DispatchLimitError, ValueError)


# Activation shapes (without K) as functions of the limit L.
STATIC_SHAPES = {
    "[1, K]": lambda L: (1,),
    "[L, K]": lambda L: (L,),
    "[1, 1, K]": lambda L: (1, 1),
    "[1, L, K]": lambda L: (1, L),
    "[L+1, K]": lambda L: (L + 1,),
    "[1, L+1, K]": lambda L: (1, L + 1),
}


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("shape_of", STATIC_SHAPES.values(), ids=STATIC_SHAPES.keys())
def test_static_m(limit: int, shape_of) -> None:
    """M = prod(x.shape[:-1]) for 2-D and 3-D activations; routed iff M <= limit."""
    shape = shape_of(limit)
    m = math.prod(shape)
    ep = mlp_program(shape)
    with et_int4.matvec_max_m(limit):
        decisions = et_int4.explain_int4_linears(ep)
        rewritten = et_int4.rewrite_int4_linears(ep)
    routed = m <= limit
    assert [(d.name, d.m_min, d.m_max, d.routed) for d in decisions] == [
        ("up_proj", m, m, routed), ("down_proj", m, m, routed)]
    assert _op_count(rewritten) == (2 if routed else 0)
    assert all(str(limit) in d.reason for d in decisions)
    if routed:
        x = torch.randn(*shape, 64, dtype=torch.bfloat16)
        assert torch.isfinite(rewritten.module()(x).float()).all()
        assert all(n.args[5] == limit for n in rewritten.graph.nodes if n.target == OP)


@pytest.mark.parametrize("limit", LIMITS)
def test_dynamic_m_up_to_limit_is_routed(limit: int) -> None:
    ep = mlp_program((2,), dynamic_shapes=({0: Dim("m", min=1, max=limit)},))
    with et_int4.matvec_max_m(limit):
        decisions = et_int4.explain_int4_linears(ep)
        rewritten = et_int4.rewrite_int4_linears(ep)
    assert [(d.m_min, d.m_max, d.routed) for d in decisions] == [(1, limit, True)] * 2
    assert _op_count(rewritten) == 2
    for m in (1, limit):
        out = rewritten.module()(torch.randn(m, 64, dtype=torch.bfloat16))
        assert out.shape == (m, 32)


@pytest.mark.parametrize("limit", LIMITS)
def test_dynamic_m_above_limit_stays_dequantize_and_linear(limit: int) -> None:
    ep = mlp_program((limit + 3,), dynamic_shapes=({0: Dim("m", min=limit + 1, max=512)},))
    with et_int4.matvec_max_m(limit):
        decisions = et_int4.explain_int4_linears(ep)
        rewritten = et_int4.rewrite_int4_linears(ep)
    assert [(d.m_min, d.m_max, d.routed) for d in decisions] == [(limit + 1, 512, False)] * 2
    assert _op_count(rewritten) == 0
    for m in (limit + 1, 512):  # over the packed weights (test_rewrite_pass.py), bit-identical
        x = torch.randn(m, 64, dtype=torch.bfloat16)
        assert torch.equal(rewritten.module()(x), ep.module()(x))


@pytest.mark.parametrize("limit", LIMITS)
def test_dynamic_m_straddling_limit_raises(limit: int) -> None:
    ep = mlp_program((3,), dynamic_shapes=({0: Dim("m", min=2, max=512)},))
    for call in (et_int4.explain_int4_linears, et_int4.rewrite_int4_linears):
        with et_int4.matvec_max_m(limit), pytest.raises(et_int4.DispatchLimitError) as info:
            call(ep)
        message = str(info.value)
        assert "up_proj" in message
        assert "[2, 512]" in message
        assert f"MATVEC_MAX_M={limit}" in message
        assert f"min={limit + 1}" in message


def test_unbounded_dynamic_m() -> None:
    ep = mlp_program((3, 5), dynamic_shapes=({0: Dim("b", min=2), 1: Dim("s", min=3)},))
    decisions = et_int4.explain_int4_linears(ep)
    assert [(d.m_min, d.m_max, d.routed) for d in decisions] == [(6, float("inf"), False)] * 2


def test_explicit_argument_routes_and_does_not_leak() -> None:
    ep = mlp_program((8,))
    assert not any(d.routed for d in et_int4.explain_int4_linears(ep))
    assert all(d.routed for d in et_int4.explain_int4_linears(ep, matvec_max_m=8))
    assert _op_count(et_int4.rewrite_int4_linears(ep, matvec_max_m=8)) == 2
    assert et_int4.get_matvec_max_m() == 4
    # An explicit value wins over the one in effect.
    with et_int4.matvec_max_m(8):
        assert _op_count(et_int4.rewrite_int4_linears(ep, matvec_max_m=4)) == 0


@pytest.mark.parametrize("bad", [0, "shim+1", 2.5])
def test_explicit_argument_is_checked(bad: object) -> None:
    if bad == "shim+1":
        bad = et_int4.SHIM_GEMM_MAX_M + 1
    ep = mlp_program((1,))
    for call in (et_int4.explain_int4_linears, et_int4.rewrite_int4_linears):
        with pytest.raises(et_int4.DispatchLimitError, match="SHIM_GEMM_MAX_M"):
            call(ep, matvec_max_m=bad)
    assert et_int4.get_matvec_max_m() == 4
