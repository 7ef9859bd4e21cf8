"""et_int4_in_cuda_backend: registers the op with ExecuTorch's CudaBackend only while it is active.

Runs on CPU: importing the CUDA backend needs only the ``triton`` package, not a GPU.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="ExecuTorch's CUDA backend imports triton")

import torch  # noqa: E402
from executorch.backends.cuda.cuda_backend import CudaBackend  # noqa: E402

import et_int4  # noqa: E402,F401  (registers the op)
from et_int4.backends.cuda.int4 import aoti  # noqa: E402
from et_int4.backends.cuda.int4.cuda_backend import et_int4_in_cuda_backend  # noqa: E402

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
