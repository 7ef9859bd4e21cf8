"""rewrite_int4_linears on exported torchao int4 models: graph shape, numerics, and what it leaves."""

from __future__ import annotations

import et_int4
import pytest
import torch
from et_int4.backends.cuda.int4.packing import pack_torchao_weight
from models import MLP, Tied, export, mlp_program, quantized
from numerics import rel_error
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind

OP = torch.ops.et_int4.et_int4_plain_mm.default
DEQUANTIZE = torch.ops.torchao.dequantize_affine.default


def _targets(ep: torch.export.ExportedProgram) -> list:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def _linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's numerics for one linear, from the torchao weight."""
    packed = pack_torchao_weight(weight)
    y = et_int4.w4a8_reference(x.reshape(-1, x.shape[-1]), packed.qdata, packed.scale, packed.zero,
                               packed.group_size).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


@pytest.mark.parametrize("shape", [(3,), (1, 4), (2, 2)], ids=str)
@pytest.mark.parametrize("asymmetric", [False, True])
def test_rewritten_mlp_is_the_reference(shape: tuple[int, ...], asymmetric: bool) -> None:
    model = quantized(MLP(), asymmetric=asymmetric)
    x = torch.randn(*shape, 64, dtype=torch.bfloat16)
    ep = export(model, x)
    rewritten = et_int4.rewrite_int4_linears(ep)

    targets = _targets(rewritten)
    assert targets.count(OP) == 2
    assert DEQUANTIZE not in targets
    assert torch.ops.export.access_subclass_inner_tensor.default not in targets

    x = torch.randn(*shape, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = rewritten.module()(x)
        original = ep.module()(x)
    h = torch.relu(_linear(x, model.up_proj.weight))
    expected = _linear(h, model.down_proj.weight, model.down_proj.bias)
    assert y.shape == (*shape, 32)
    assert torch.equal(y, expected)
    # W4A8 against the W4A16 dequantize + linear it replaces.
    assert rel_error(y, original) < 3e-2


def test_signature_and_packed_buffers() -> None:
    ep = mlp_program((2,))
    rewritten = et_int4.rewrite_int4_linears(ep)
    assert not rewritten.constants
    placeholders = [n.name for n in rewritten.graph.nodes if n.op == "placeholder"]
    assert placeholders == [s.arg.name for s in rewritten.graph_signature.input_specs]
    assert "p_up_proj_weight" not in placeholders and "p_down_proj_weight" not in placeholders
    assert placeholders[-1] == "x"  # the packed weights go before the user inputs
    # Persistent buffers named after the weights (AOTInductor keeps those names, test_aoti.py).
    buffers = {s.target for s in rewritten.graph_signature.input_specs
               if s.kind == InputKind.BUFFER and s.persistent}
    new = {k: (v.dtype, tuple(v.shape)) for k, v in rewritten.state_dict.items() if k != "down_proj.bias"}
    assert buffers == new.keys()
    assert new == {
        # Tiled: [N/32, 16*K] nibbles, [N/32, 32*K/group_size] scales (group_size 32); torchao's
        # symmetric default stores one 8 per tile: [N/32, 1].
        "up_proj.weight_et_int4_qdata": (torch.uint8, (3, 1024)),
        "up_proj.weight_et_int4_scale": (torch.bfloat16, (3, 64)),
        "up_proj.weight_et_int4_zero": (torch.int8, (3, 1)),
        "down_proj.weight_et_int4_qdata": (torch.uint8, (1, 1536)),
        "down_proj.weight_et_int4_scale": (torch.bfloat16, (1, 96)),
        "down_proj.weight_et_int4_zero": (torch.int8, (1, 1)),
    }
    packed = pack_torchao_weight(ep.state_dict["up_proj.weight"])
    assert torch.equal(rewritten.state_dict["up_proj.weight_et_int4_qdata"], packed.qdata)
    assert torch.equal(rewritten.state_dict["up_proj.weight_et_int4_scale"], packed.scale)
    assert torch.equal(rewritten.state_dict["up_proj.weight_et_int4_zero"], packed.zero)
    for node in rewritten.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, node
    assert all(n.meta["nn_module_stack"] for n in rewritten.graph.nodes if n.target == OP)


def test_original_is_unchanged() -> None:
    ep = mlp_program((2,))
    code, specs, keys = ep.graph_module.code, list(ep.graph_signature.input_specs), set(ep.state_dict)
    et_int4.rewrite_int4_linears(ep)
    assert ep.graph_module.code == code
    assert list(ep.graph_signature.input_specs) == specs
    assert set(ep.state_dict) == keys and not ep.constants


class _KeptAndBuffered(nn.Module):
    """A routed linear with a bias, an unrouted one (M = 16 rows), a buffer and a tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.routed = nn.Linear(64, 32)
        self.kept = nn.Linear(64, 32, bias=False)
        self.register_buffer("offset", torch.zeros(32, dtype=torch.bfloat16))
        self.lifted = torch.ones(32, dtype=torch.bfloat16)  # a plain attribute: a lifted constant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.routed(a) + self.offset, self.kept(b) * self.lifted


def test_tensors_not_replaced_are_shared_not_copied() -> None:
    # A copy of every weight would hold two copies of a model in memory while it is exported.
    model = quantized(_KeptAndBuffered())
    ep = export(model, torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(16, 64, dtype=torch.bfloat16))
    assert ep.constants, "the model should have a lifted tensor constant"
    rewritten = et_int4.rewrite_int4_linears(ep)
    assert _targets(rewritten).count(OP) == 1
    packed = {f"{layer}.weight_et_int4_{field}" for layer in ("routed", "kept")
              for field in ("qdata", "scale", "zero")}
    assert set(rewritten.state_dict) == {"routed.bias", "offset"} | packed
    for key in rewritten.state_dict.keys() - packed:
        assert rewritten.state_dict[key] is ep.state_dict[key], key
    kept_constants = ep.constants.keys() & rewritten.constants.keys()
    assert kept_constants == ep.constants.keys()
    for key in kept_constants:
        assert rewritten.constants[key] is ep.constants[key], key


def test_placeholder_named_input() -> None:
    """nn.Sequential names its argument ``input``, which copying a graph renames."""
    model = quantized(nn.Sequential(nn.Linear(64, 32)))
    ep = export(model, torch.randn(1, 64, dtype=torch.bfloat16))
    assert ep.graph_signature.user_inputs == ("input",)
    rewritten = et_int4.rewrite_int4_linears(ep)
    assert rewritten.graph_signature.user_inputs == ("input",)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert torch.equal(rewritten.module()(x), _linear(x, model[0].weight, model[0].bias))


def test_dynamic_m_runs_at_each_size() -> None:
    model = quantized(MLP())
    ep = export(model, torch.randn(2, 2, 64, dtype=torch.bfloat16),
                dynamic_shapes=({0: Dim("b", min=1, max=2), 1: Dim("s", min=1, max=2)},))
    rewritten = et_int4.rewrite_int4_linears(ep)
    assert _targets(rewritten).count(OP) == 2
    for shape in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        x = torch.randn(*shape, 64, dtype=torch.bfloat16)
        h = torch.relu(_linear(x, model.up_proj.weight))
        expected = _linear(h, model.down_proj.weight, model.down_proj.bias)
        assert torch.equal(rewritten.module()(x), expected)


def test_dynamic_m_from_zero_gives_empty_results() -> None:
    model = quantized(MLP())
    ep = export(model, torch.randn(1, 3, 64, dtype=torch.bfloat16),
                dynamic_shapes=({1: Dim("T", min=0, max=4)},))
    rewritten = et_int4.rewrite_int4_linears(ep)
    assert [(d.m_min, d.m_max, d.routed) for d in et_int4.explain_int4_linears(ep)] == [(0, 4, True)] * 2
    with torch.no_grad():
        y = rewritten.module()(torch.randn(1, 0, 64, dtype=torch.bfloat16))
        assert y.shape == ep.module()(torch.randn(1, 0, 64, dtype=torch.bfloat16)).shape == (1, 0, 32)
        x = torch.randn(1, 4, 64, dtype=torch.bfloat16)
        expected = _linear(torch.relu(_linear(x, model.up_proj.weight)), model.down_proj.weight,
                           model.down_proj.bias)
        assert torch.equal(rewritten.module()(x), expected)


def test_tied_weight_both_routed() -> None:
    model = quantized(Tied())
    a, b = (torch.randn(m, 64, dtype=torch.bfloat16) for m in (1, 3))
    ep = export(model, a, b)
    rewritten = et_int4.rewrite_int4_linears(ep)
    ops = [n for n in rewritten.graph.nodes if n.target == OP]
    assert len(ops) == 2
    assert ops[0].args[1:4] == ops[1].args[1:4]  # packed once
    assert len(rewritten.state_dict.keys() - ep.state_dict.keys()) == 3
    assert DEQUANTIZE not in _targets(rewritten)
    used = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
    remaining = {n.name for n in rewritten.graph.nodes if n.op == "placeholder"}
    assert not (used & remaining) - {"a", "b"}
    ya, yb = rewritten.module()(a, b)
    assert torch.equal(ya, _linear(a, model.first.weight))
    assert torch.equal(yb, _linear(b, model.second.weight))


def test_tied_weight_one_routed_one_not_share_the_packed_weight() -> None:
    model = quantized(Tied())
    a, b = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(16, 64, dtype=torch.bfloat16)
    ep = export(model, a, b)
    decisions = et_int4.explain_int4_linears(ep)
    assert [(d.name, d.routed) for d in decisions] == [("first", True), ("second", False)]
    rewritten = et_int4.rewrite_int4_linears(ep)
    targets = _targets(rewritten)
    assert targets.count(OP) == 1 and targets.count(DEQUANTIZE) == 1
    assert len(rewritten.state_dict.keys() - ep.state_dict.keys()) == 3  # packed once
    # Export lifts the tied weight once per name and reads one: neither is read any more.
    weights = {s.arg.name for s in rewritten.graph_signature.input_specs if s.target in ep.state_dict}
    assert not any(n.users for n in rewritten.graph.nodes if n.name in weights)
    op = next(n for n in rewritten.graph.nodes if n.target == OP)
    assert _packed_inputs(rewritten) == {a.name for a in op.args[1:4]}
    ya, yb = rewritten.module()(a, b)
    ea, eb = ep.module()(a, b)
    assert torch.equal(ya, _linear(a, model.first.weight))
    assert torch.equal(yb, eb)


def _packed_inputs(ep: torch.export.ExportedProgram) -> set[str]:
    """The placeholders that the dequantize_affine nodes read, through the graph's unpacking."""
    return {n.name for d in ep.graph.nodes if d.target == DEQUANTIZE
            for n in _ancestors(d) if n.op == "placeholder"}


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


@pytest.mark.parametrize("shape", [(5,), (2, 8), (1, 3, 7)], ids=str)
@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "per-group zero"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_large_m_reads_the_packed_weights_bit_identically(shape, asymmetric, group_size) -> None:
    model = quantized(MLP(k=128, hidden=192), group_size=group_size, asymmetric=asymmetric)
    ep = export(model, torch.randn(*shape, 128, dtype=torch.bfloat16))
    decisions = et_int4.explain_int4_linears(ep)
    assert [d.routed for d in decisions] == [False, False]
    assert all("reading the packed weights" in d.reason for d in decisions)
    rewritten = et_int4.rewrite_int4_linears(ep)

    targets = _targets(rewritten)
    assert targets.count(DEQUANTIZE) == 2 and OP not in targets
    assert torch.ops.export.access_subclass_inner_tensor.default not in targets
    packed = {f"{layer}.weight_et_int4_{field}" for layer in ("up_proj", "down_proj")
              for field in ("qdata", "scale", "zero")}
    assert set(rewritten.state_dict) == packed | {"down_proj.bias"} and not rewritten.constants
    assert _packed_inputs(rewritten) == {s.arg.name for s in rewritten.graph_signature.input_specs
                                         if s.target in packed}
    for node in rewritten.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, node
    for _ in range(3):
        x = torch.randn(*shape, 128, dtype=torch.bfloat16) * 4
        with torch.no_grad():
            assert torch.equal(rewritten.module()(x), ep.module()(x))


def test_dynamic_large_m_and_a_routed_method_share_the_buffers() -> None:
    """A prefill-like export (M in [5, 64]) and a verify-like one (M = 4) of one model."""
    model = quantized(MLP(), asymmetric=True)
    prefill = export(model, torch.randn(1, 16, 64, dtype=torch.bfloat16),
                     dynamic_shapes=({1: Dim("T", min=5, max=64)},))
    verify = export(model, torch.randn(1, 4, 64, dtype=torch.bfloat16))
    prefill_r, verify_r = (et_int4.rewrite_int4_linears(ep) for ep in (prefill, verify))
    assert _targets(verify_r).count(OP) == 2 and OP not in _targets(prefill_r)
    assert set(prefill_r.state_dict) == set(verify_r.state_dict)
    for key, tensor in prefill_r.state_dict.items():
        assert torch.equal(tensor, verify_r.state_dict[key]), key
    for t in (5, 17, 64):
        x = torch.randn(1, t, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(prefill_r.module()(x), prefill.module()(x))


def test_large_m_graph_lowers_to_the_edge_dialect() -> None:
    """ExecuTorch's to_edge with its Core ATen check on: the unpacking is plain ops, and it adds no
    tensor constants (the edge lowering names those by a per-program counter)."""
    to_edge = pytest.importorskip("executorch.exir").to_edge
    config = pytest.importorskip("executorch.exir").EdgeCompileConfig(_check_ir_validity=True)
    model = quantized(MLP(), asymmetric=True)
    ep = export(model, torch.randn(1, 16, 64, dtype=torch.bfloat16),
                dynamic_shapes=({1: Dim("T", min=5, max=64)},))
    edge = to_edge(et_int4.rewrite_int4_linears(ep), compile_config=config).exported_program()
    assert set(edge.state_dict) == set(et_int4.rewrite_int4_linears(ep).state_dict)
    assert not edge.constants
    x = torch.randn(1, 9, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(edge.module()(x), ep.module()(x))


@pytest.mark.parametrize("case, reason", [
    ("float32", "bfloat16"),
    ("group16", "multiple of 32"),
])
def test_left_alone_with_a_reason(case: str, reason: str) -> None:
    if case == "float32":
        ep = mlp_program((1,), dtype=torch.float32)
    else:
        ep = mlp_program((1,), group_size=16)
    decisions = et_int4.explain_int4_linears(ep)
    assert len(decisions) == 2
    assert all(not d.routed and reason in d.reason for d in decisions)
    rewritten = et_int4.rewrite_int4_linears(ep)
    assert OP not in _targets(rewritten)
    assert str(rewritten.graph) == str(ep.graph)


class _Widths(nn.Module):
    """Two int4 linears of one input: 48 output features (no whole tiles of 32 rows) and 64."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = nn.Linear(64, 48, bias=False)
        self.wide = nn.Linear(64, 64, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.narrow(x), self.wide(x)


def test_output_features_off_the_tiles_are_left_alone() -> None:
    model = quantized(_Widths(), asymmetric=True)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    ep = export(model, x)
    decisions = {d.name: d for d in et_int4.explain_int4_linears(ep)}
    assert set(decisions) == {"narrow", "wide"}
    assert not decisions["narrow"].routed
    assert decisions["narrow"].reason.startswith("the kernel takes weights in tiles of 32 output rows")
    assert "N=48" in decisions["narrow"].reason
    assert decisions["wide"].routed
    rewritten = et_int4.rewrite_int4_linears(ep)
    targets = _targets(rewritten)
    assert targets.count(OP) == 1 and targets.count(DEQUANTIZE) == 1
    op = next(n for n in rewritten.graph.nodes if n.target == OP)
    assert op.meta["nn_module_stack"] and list(op.meta["nn_module_stack"].values())[-1][0] == "wide"
    assert "narrow.weight" in rewritten.state_dict and "wide.weight" not in rewritten.state_dict
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        narrow, wide = rewritten.module()(x)
        original_narrow, _ = ep.module()(x)
    assert torch.equal(narrow, original_narrow)  # still dequantize + linear
    assert torch.equal(wide, _linear(x, model.wide.weight, model.wide.bias))


def test_plain_linears_are_not_listed() -> None:
    model = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    ep = export(model, torch.randn(1, 64, dtype=torch.bfloat16))
    assert et_int4.explain_int4_linears(ep) == []


def test_decision_is_frozen() -> None:
    decision = et_int4.explain_int4_linears(mlp_program((1,)))[0]
    assert isinstance(decision, et_int4.Int4LinearDecision)
    with pytest.raises(AttributeError):
        decision.routed = False


def test_run_decompositions_and_serialization(tmp_path) -> None:
    model = quantized(MLP())
    ep = export(model, torch.randn(1, 2, 64, dtype=torch.bfloat16),
                dynamic_shapes=({1: Dim("s", min=1, max=4)},))
    rewritten = et_int4.rewrite_int4_linears(ep)
    decomposed = rewritten.run_decompositions({})
    assert _targets(decomposed).count(OP) == 2
    path = tmp_path / "rewritten.pt2"
    torch.export.save(rewritten, path)
    loaded = torch.export.load(path)
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    expected = rewritten.module()(x)
    assert torch.equal(decomposed.module()(x), expected)
    assert torch.equal(loaded.module()(x), expected)
