"""The EAGLE export holds each int4 weight once: prefill reads the packed buffers that target_verify
calls et_int4_plain_mm with, under the same names, in torch.export's programs and in ExecuTorch's
edge programs (ExecuTorch's CUDA backend shares constants across methods by those names)."""

from __future__ import annotations

import pytest
import torch
from et_int4.export.export_eagle import ExportOptions, export_eagle

OPTIONS = ExportOptions(config="tiny", chain_len=3, matvec_max_m=4, max_seq_len=32)
DEQUANTIZE = torch.ops.torchao.dequantize_affine.default


@pytest.fixture(scope="module")
def exported():
    return export_eagle(OPTIONS)


def _tensors(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    return {**ep.state_dict, **ep.constants}


def _torchao_weights(ep: torch.export.ExportedProgram) -> list[str]:
    return [name for name, t in _tensors(ep).items() if hasattr(t, "qdata")]


def test_prefill_holds_the_packed_weights_of_verify(exported):
    prefill, verify = exported.programs["prefill"], exported.programs["target_verify"]
    assert _torchao_weights(exported.exported["prefill"]), "the export should start from torchao weights"
    for ep in exported.programs.values():
        assert _torchao_weights(ep) == []
    assert sum(n.target == DEQUANTIZE for n in prefill.graph.nodes) == len(
        next(s for s in exported.summary if s.name == "prefill").kept)
    packed = {name for name in _tensors(verify) if "_et_int4_" in name}
    assert packed, "target_verify should call et_int4_plain_mm with packed weights"
    assert _tensors(verify).keys() <= _tensors(prefill).keys()
    for name, tensor in _tensors(verify).items():
        assert torch.equal(_tensors(prefill)[name], tensor), name


def test_prefill_is_bit_identical_to_the_export(exported):
    original = exported.exported["prefill"].module()
    rewritten = exported.programs["prefill"].module()
    n = OPTIONS.min_prefill_len + 4
    tokens = torch.randint(0, OPTIONS.model_args.vocab_size, (1, n))
    with torch.no_grad():
        for out, ref in zip(rewritten(tokens, torch.arange(n)), original(tokens, torch.arange(n))):
            assert torch.equal(out, ref)


@pytest.mark.slow
def test_edge_programs_of_prefill_and_verify_agree_on_every_name(exported):
    """to_edge (the step before the CUDA partitioner) with the Core ATen check on. It lifts numbers
    into constants named by a per-program counter; prefill's unpacking must add none, or the same
    name would hold different tensors in prefill and target_verify."""
    exir = pytest.importorskip("executorch.exir")
    config = exir.EdgeCompileConfig(_check_ir_validity=True, _skip_dim_order=True)
    edge = {name: exir.to_edge(exported.programs[name], compile_config=config).exported_program()
            for name in ("prefill", "target_verify")}
    prefill, verify = (_tensors(edge[name]) for name in ("prefill", "target_verify"))
    assert verify.keys() <= prefill.keys()
    for name, tensor in verify.items():
        other = prefill[name]
        assert (other.dtype, other.shape) == (tensor.dtype, tensor.shape) and torch.equal(other, tensor), name
