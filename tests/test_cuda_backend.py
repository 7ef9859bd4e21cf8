"""et_int4_in_cuda_backend: registers the op with ExecuTorch's CudaBackend only while it is active.

Runs on CPU: importing the CUDA backend needs only the ``triton`` package, not a GPU.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="ExecuTorch's CUDA backend imports triton")

import collections  # noqa: E402
import random  # noqa: E402

import et_int4  # noqa: E402,F401  (registers the op)
import torch  # noqa: E402
from et_int4.backends.cuda.int4.cuda_backend import (  # noqa: E402
    _in_graph_order,
    _repeat_kv_heads,
    et_int4_in_cuda_backend,
)
from et_int4.runtime import aoti  # noqa: E402
from executorch.backends.cuda.cuda_backend import CudaBackend  # noqa: E402

_C_SHIMS = "aot_inductor.custom_ops_to_c_shims"
_OP = torch.ops.et_int4.et_int4_plain_mm.default


def _originals():
    return (CudaBackend.__dict__["get_aoti_compile_options"],
            CudaBackend.__dict__["get_supported_fallback_kernels"])


def _assert_registered():
    shims = CudaBackend.get_aoti_compile_options([])[_C_SHIMS]
    assert shims[_OP] == [aoti.c_shim_declaration("cuda")]
    fallbacks = CudaBackend.get_supported_fallback_kernels()
    assert aoti.QUALIFIED_OP_NAME in fallbacks
    assert aoti.c_shim_name("cuda") in fallbacks


def _assert_not_registered():
    assert _OP not in CudaBackend.get_aoti_compile_options([]).get(_C_SHIMS, {})
    fallbacks = CudaBackend.get_supported_fallback_kernels()
    assert aoti.QUALIFIED_OP_NAME not in fallbacks
    assert aoti.c_shim_name("cuda") not in fallbacks


def test_registered_inside_and_restored_after():
    before = _originals()
    backend_options = CudaBackend.get_aoti_compile_options([])
    backend_fallbacks = CudaBackend.get_supported_fallback_kernels()
    _assert_not_registered()
    with et_int4_in_cuda_backend():
        _assert_registered()
        # The backend's own entries stay: its shim map (ExecuTorch >= 1.3), options, kernels.
        options = CudaBackend.get_aoti_compile_options([])
        assert backend_options.get(_C_SHIMS, {}).items() <= options[_C_SHIMS].items()
        assert {k: v for k, v in options.items() if k != _C_SHIMS} == {
            k: v for k, v in backend_options.items() if k != _C_SHIMS}
        assert backend_fallbacks.items() <= CudaBackend.get_supported_fallback_kernels().items()
    assert _originals() == before
    _assert_not_registered()


def test_restored_on_exception():
    before = _originals()
    with pytest.raises(RuntimeError, match="lowering failed"):
        with et_int4_in_cuda_backend():
            _assert_registered()
            raise RuntimeError("lowering failed")
    assert _originals() == before
    _assert_not_registered()


def test_keeps_a_global_inductor_patch():
    # ExecuTorch 1.2's backend has no shim map of its own: there a global patch is the way in.
    import torch._inductor.config as inductor_config

    other = object()
    with inductor_config.patch({_C_SHIMS: {other: ["decl"]}}), et_int4_in_cuda_backend():
        shims = CudaBackend.get_aoti_compile_options([])[_C_SHIMS]
        assert shims[other] == ["decl"] and _OP in shims


def test_nested_use_restores_the_outer_registration():
    with et_int4_in_cuda_backend():
        with et_int4_in_cuda_backend():
            _assert_registered()
        _assert_registered()
    _assert_not_registered()


# -- ExecuTorch 1.2: a delegate's outputs follow the partition's topological order ---------------

def _breadth_first_topo_sort(nodes):
    """torch 2.11's ``fuser_utils.topo_sort``: Kahn's algorithm with a FIFO queue."""
    indegree = dict.fromkeys(nodes, 0)
    for node in nodes:
        indegree[node] = sum(n in indegree for n in node.all_input_nodes)
    queue = collections.deque(n for n in nodes if indegree[n] == 0)
    order = []
    while queue:
        order.append(node := queue.popleft())
        for user in node.users:
            if user in indegree:
                indegree[user] -= 1
                if indegree[user] == 0:
                    queue.append(user)
    return order


class _TapThenCacheWrite(torch.nn.Module):
    """An early hidden state returned as an output, a cache written late (an EAGLE target layer)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(4, 8))

    def forward(self, x):
        tap = x * 2
        h = torch.tanh(torch.sin(torch.cos(tap) + 1))
        self.cache.index_put_((torch.tensor([0]),), h)
        return h.sum(), tap + 1


def test_partition_nodes_keep_graph_order():
    graph = torch.export.export(_TapThenCacheWrite(), (torch.randn(1, 8),)).graph
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    shuffled = random.Random(0).sample(nodes, len(nodes))
    assert _in_graph_order(shuffled) == nodes
    # Breadth first, the tap's output is ready before the cache write: the order ExecuTorch 1.2
    # misreads as a buffer mutation.
    bfs = _breadth_first_topo_sort(shuffled)
    index_put = next(n for n in nodes if "index_put" in str(n.target))
    tap_out = graph.output_node().args[0][-1]
    assert bfs.index(tap_out) < bfs.index(index_put)
    assert nodes.index(tap_out) > nodes.index(index_put)


def test_executorch_1_2_fixes_apply_to_1_2_only(monkeypatch):
    from et_int4.backends.cuda.int4 import cuda_backend
    from executorch.exir import lowered_backend_module as lowering

    monkeypatch.setattr(lowering, "topo_sort", _breadth_first_topo_sort)
    before = CudaBackend.__dict__["get_custom_passes"]
    monkeypatch.setattr(cuda_backend, "_executorch_version", lambda: (1, 3))
    with et_int4_in_cuda_backend():
        assert lowering.topo_sort is _breadth_first_topo_sort
        assert CudaBackend.__dict__["get_custom_passes"] is before
    monkeypatch.setattr(cuda_backend, "_executorch_version", lambda: (1, 2))
    with et_int4_in_cuda_backend():
        assert lowering.topo_sort is _in_graph_order
        passes = CudaBackend.get_custom_passes([])
        assert passes[0] is _repeat_kv_heads and len(passes) >= 1
        _assert_registered()
    assert lowering.topo_sort is _breadth_first_topo_sort
    assert CudaBackend.__dict__["get_custom_passes"] is before
    _assert_not_registered()


class _GroupedQueryAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                enable_gqa=True)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_repeat_kv_heads_keeps_grouped_query_attention(kv_heads):
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.exir.dialects._ops import ops as exir_ops

    q = torch.randn(1, 4, 3, 16)
    k, v = torch.randn(2, 1, kv_heads, 8, 16).unbind(0)
    mask = torch.rand(1, 1, 3, 8) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    inputs = (q, k, v, mask)
    expected = _GroupedQueryAttention()(*inputs)
    sdpa_op = torch.ops.aten.scaled_dot_product_attention.default
    program = to_edge(  # keeps SDPA whole, as the CUDA partitioner does
        torch.export.export(_GroupedQueryAttention(), inputs).run_decompositions({}),
        compile_config=EdgeCompileConfig(_check_ir_validity=False, preserve_ops=[sdpa_op]),
    ).exported_program()
    result = _repeat_kv_heads(program.graph_module)
    assert result.modified == (kv_heads != 4)
    (sdpa,) = program.graph.find_nodes(
        op="call_function", target=exir_ops.edge.aten.scaled_dot_product_attention.default)
    heads = [arg.meta["val"].shape[1] for arg in sdpa.args[:3]]
    assert heads == [4, 4, 4]
    assert sdpa.kwargs.get("enable_gqa", False) == (kv_heads == 4)  # left as it was
    torch.testing.assert_close(program.module()(*inputs), expected)
