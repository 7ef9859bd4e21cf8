"""Lowering ``et_int4_plain_mm`` through ExecuTorch's CUDA backend.

The backend compiles each method with AOTInductor. Two of its classmethods decide what a custom op
becomes: ``get_aoti_compile_options`` returns the ``aot_inductor.custom_ops_to_c_shims`` map (the
ops that become direct C calls), and ``get_supported_fallback_kernels`` lists the kernels the
ExecuTorch runtime provides; lowering fails for a fallback kernel that is not listed. Our op needs
to be in both while a program is lowered, and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from et_int4.backends.cuda.int4 import aoti

__all__ = ["et_int4_in_cuda_backend"]

_C_SHIMS = "aot_inductor.custom_ops_to_c_shims"
_DEVICE = "cuda"


@contextlib.contextmanager
def et_int4_in_cuda_backend() -> Iterator[None]:
    """Make ExecuTorch's ``CudaBackend`` compile ``et_int4_plain_mm`` to a call of
    ``aoti_torch_cuda_et_int4_plain_mm`` (provided by libet_int4 at run time).

    Wrap ``to_edge_transform_and_lower(..., partitioner=[CudaPartitioner(...)])`` in it. The
    backend's classmethods are restored on exit, also when lowering raises.
    """
    # Imported here: the CUDA backend imports triton, which CPU-only installs may lack.
    import torch._inductor.config as inductor_config
    from executorch.backends.cuda.cuda_backend import CudaBackend

    import et_int4  # noqa: F401  (registers the op that the shim map names)

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

    CudaBackend.get_aoti_compile_options = classmethod(get_aoti_compile_options)
    CudaBackend.get_supported_fallback_kernels = classmethod(get_supported_fallback_kernels)
    try:
        yield
    finally:
        CudaBackend.get_aoti_compile_options = original_options
        CudaBackend.get_supported_fallback_kernels = original_fallbacks
