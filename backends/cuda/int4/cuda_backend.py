"""Lowering ``et_int4_plain_mm`` through ExecuTorch's CUDA backend.

The backend compiles each method with AOTInductor. Two of its classmethods decide what a custom op
becomes: ``get_aoti_compile_options`` returns the ``aot_inductor.custom_ops_to_c_shims`` map (the
ops that become direct C calls), and ``get_supported_fallback_kernels`` lists the kernels the
ExecuTorch runtime provides; lowering fails for a fallback kernel that is not listed. Our op needs
to be in both while a program is lowered, and nowhere else.

ExecuTorch 1.2 (the release pinned to torch 2.11) needs two more fixes to lower a Llama-style
model; ``_executorch_1_2_fixes`` applies them, for the same span, and only there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch

from ....runtime import aoti
from . import op  # noqa: F401  (registers the op that the shim map names)

__all__ = ["et_int4_in_cuda_backend"]

_C_SHIMS = "aot_inductor.custom_ops_to_c_shims"
_DEVICE = "cuda"


def _executorch_version() -> tuple[int, int]:
    from executorch.version import __version__

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


def _in_graph_order(nodes):
    """Topological order of a partition: the graph's own order, which is topological."""
    if not nodes:
        return list(nodes)
    position = {node: i for i, node in enumerate(nodes[0].graph.nodes)}
    return sorted(nodes, key=position.__getitem__)


def _repeat_kv_heads(graph_module: torch.fx.GraphModule):
    """Repeat K and V to the query's head count in grouped-query SDPA, as enable_gqa does."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from torch.fx.passes.infra.pass_base import PassResult

    graph = graph_module.graph
    repeat = exir_ops.edge.aten.repeat_interleave.self_int
    changed = False
    for node in graph.find_nodes(op="call_function",
                                 target=exir_ops.edge.aten.scaled_dot_product_attention.default):
        query, key, value = node.args[:3]
        groups = query.meta["val"].shape[-3] // key.meta["val"].shape[-3]
        if not node.kwargs.get("enable_gqa") or groups == 1:
            continue
        repeated = []
        with graph.inserting_before(node):
            for kv in (key, value):
                out = graph.call_function(repeat, (kv, groups), {"dim": -3})
                out.meta["val"] = torch.repeat_interleave(kv.meta["val"], groups, dim=-3)
                repeated.append(out)
        node.args = (query, *repeated, *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": False}
        changed = True
    if changed:
        graph_module.recompile()
    return PassResult(graph_module, changed)


@contextlib.contextmanager
def _executorch_1_2_fixes(backend) -> Iterator[None]:
    """Two ExecuTorch 1.2 limits that ExecuTorch 1.3 removed.

    - A delegate's buffer mutations must be the first outputs of its submodule, which follow
      ``topo_sort`` of the partition. torch 2.11's ``topo_sort`` is breadth first: an EAGLE tap (a
      user output) lands before the last layers' KV-cache writes, and the lowered program fails
      verification ("Mutation node aten_cat_default is neither a buffer nor a user input").
      Sorting partitions in graph order puts every cache write first. (1.3 reorders the outputs.)
    - The backend replaces SDPA with its Triton kernel, which takes equal head counts only
      ("Head dimension must match; got H_q=4, H_k=2"). A pass ahead of it repeats K and V's
      heads for grouped-query attention. (1.3's kernel packs GQA itself.)
    """
    from executorch.exir import lowered_backend_module as lowering

    original_passes = backend.__dict__["get_custom_passes"]

    def get_custom_passes(cls, compile_specs):
        return [_repeat_kv_heads, *original_passes.__get__(None, cls)(compile_specs)]

    with mock.patch.object(lowering, "topo_sort", _in_graph_order), \
            mock.patch.object(backend, "get_custom_passes", classmethod(get_custom_passes)):
        yield


@contextlib.contextmanager
def et_int4_in_cuda_backend() -> Iterator[None]:
    """Make ExecuTorch's ``CudaBackend`` compile ``et_int4_plain_mm`` to a call of
    ``aoti_torch_cuda_et_int4_plain_mm`` (provided by libet_int4 at run time).

    Wrap ``to_edge_transform_and_lower(..., partitioner=[CudaPartitioner(...)])`` in it. Everything
    it changes (the backend's classmethods; on ExecuTorch 1.2, also its partitioning) is restored
    on exit, also when lowering raises.
    """
    # Imported here: the CUDA backend imports triton, which CPU-only installs may lack.
    import torch._inductor.config as inductor_config
    from executorch.backends.cuda.cuda_backend import CudaBackend


    original_options = CudaBackend.__dict__["get_aoti_compile_options"]
    original_fallbacks = CudaBackend.__dict__["get_supported_fallback_kernels"]

    def get_aoti_compile_options(cls, compile_specs):
        options = original_options.__get__(None, cls)(compile_specs)
        # ExecuTorch >= 1.3 returns its own map, which replaces a global inductor config patch;
        # 1.2 returns none, so the global one applies. Merging all three serves both.
        shims = {
            **inductor_config.aot_inductor.custom_ops_to_c_shims,
            **options.get(_C_SHIMS, {}),
            **aoti.custom_ops_to_c_shims(_DEVICE),
        }
        return {**options, _C_SHIMS: shims}

    def get_supported_fallback_kernels(cls):
        # Inductor reports a C-shim call by its C name and a runtime lookup by ns::op.
        return {
            **original_fallbacks.__get__(None, cls)(),
            aoti.QUALIFIED_OP_NAME: None,
            aoti.c_shim_name(_DEVICE): None,
        }

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(
            CudaBackend, "get_aoti_compile_options", classmethod(get_aoti_compile_options)))
        patches.enter_context(mock.patch.object(
            CudaBackend, "get_supported_fallback_kernels",
            classmethod(get_supported_fallback_kernels)))
        if _executorch_version() < (1, 3):
            patches.enter_context(_executorch_1_2_fixes(CudaBackend))
        yield
