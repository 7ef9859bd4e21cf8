"""End to end through PyTorch's AOTInductor: the rewritten op becomes a direct call into libet_int4."""

from __future__ import annotations

import zipfile

import et_int4
import pytest
import torch
from et_int4 import runtime
from et_int4.runtime.aoti import c_shim_name, custom_ops_to_c_shims
from models import MLP, Chunked, quantized
from torch.export import Dim

pytestmark = pytest.mark.skipif(runtime.library_path() is None, reason="libet_int4 is not built")


def compile_and_load(program: torch.export.ExportedProgram, device: str, path):
    runtime.load()  # the generated code resolves aoti_torch_<device>_et_int4_plain_mm from it
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(path / "model.pt2"),
        inductor_configs={"aot_inductor.custom_ops_to_c_shims": custom_ops_to_c_shims(device),
                          "emulate_precision_casts": True})
    with zipfile.ZipFile(package) as archive:
        sources = "".join(archive.read(name).decode(errors="replace")
                          for name in archive.namelist() if name.endswith(".cpp"))
    return torch._inductor.aoti_load_package(package), sources


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.slow
def test_aoti_program_calls_the_shim_and_matches_eager(device, tmp_path):
    torch.manual_seed(0)
    model = quantized(MLP(k=256, hidden=512, n=128), asymmetric=True).to(device)
    example = torch.randn(2, 3, 256, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        program = et_int4.rewrite_int4_linears(torch.export.export(model, (example,)), matvec_max_m=8)
    compiled, sources = compile_and_load(program, device, tmp_path)
    assert c_shim_name(device) in sources, "the op should be a direct C call, not a Python fallback"
    for seed in range(3):
        x = torch.randn(2, 3, 256, dtype=torch.bfloat16, device=device,
                        generator=torch.Generator(device).manual_seed(seed)) * (seed + 1)
        expected = program.module()(x)
        got = compiled(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.slow
def test_aoti_program_feeds_the_shim_contiguous_rows_of_a_chunk(device, tmp_path):
    # Both halves of h.chunk(2, -1) are views with row stride 2K; the shim reads dense rows only.
    model = quantized(Chunked(k=128, n=64), asymmetric=True).to(device)
    example = torch.randn(2, 3, 128, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        program = et_int4.rewrite_int4_linears(torch.export.export(model, (example,)), matvec_max_m=8)
    assert sum(n.target == torch.ops.et_int4.et_int4_plain_mm.default for n in program.graph.nodes) == 3
    compiled, sources = compile_and_load(program, device, tmp_path)
    assert c_shim_name(device) in sources
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16, device=device)
    expected = program.module()(x)  # the eager op on the strided halves
    torch.testing.assert_close(compiled(x).float(), expected.float(), rtol=2**-7,
                               atol=1e-3 * expected.abs().max().item())


@pytest.mark.slow
def test_aoti_names_the_packed_weights_after_the_weights(tmp_path):
    # ExecuTorch's CUDA backend shares a constant across methods by this name
    # (weight_sharing_across_methods): names numbered per program would collide between methods.
    model = quantized(MLP(k=256, hidden=512, n=128), asymmetric=True)
    example = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        program = et_int4.rewrite_int4_linears(torch.export.export(model, (example,)), matvec_max_m=8)
    compiled, _ = compile_and_load(program, "cpu", tmp_path)
    packed = {f"{layer}.weight_et_int4_{field}" for layer in ("up_proj", "down_proj")
              for field in ("qdata", "scale", "zero")}
    assert packed <= set(compiled.loader.get_constant_fqns())


@pytest.mark.slow
def test_aoti_prefill_reads_only_the_packed_weights(tmp_path):
    # M in [9, 64] > MATVEC_MAX_M: dequantize + linear, unpacked in the graph from the packed buffers.
    model = quantized(MLP(k=256, hidden=512, n=128), asymmetric=True)
    example = torch.randn(1, 16, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        original = torch.export.export(model, (example,), dynamic_shapes=({1: Dim("T", min=9, max=64)},))
        program = et_int4.rewrite_int4_linears(original, matvec_max_m=8)
    compiled, _ = compile_and_load(program, "cpu", tmp_path)
    packed = {f"{layer}.weight_et_int4_{field}" for layer in ("up_proj", "down_proj")
              for field in ("qdata", "scale", "zero")}
    assert set(compiled.loader.get_constant_fqns()) == packed | {"down_proj.bias"}
    for t in (9, 33, 64):
        x = torch.randn(1, t, 256, dtype=torch.bfloat16)
        expected = original.module()(x)
        torch.testing.assert_close(compiled(x).float(), expected.float(), rtol=2**-7,
                                   atol=1e-3 * expected.abs().max().item())
