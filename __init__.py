"""et-int4: weight-stationary INT4 linears for small batches (M = 1..8) in the ExecuTorch CUDA backend.

Importing this package registers ``torch.ops.et_int4.et_int4_plain_mm``. The repository root is this
package (pyproject.toml maps it to ``et_int4``), so every relative import below names a file of the
checkout. libet_int4 loads on first use: ``SHIM_GEMM_MAX_M`` is read from it when first asked for.
"""

from .backends.cuda.int4 import limits as _limits
from .backends.cuda.int4 import op as _op  # noqa: F401  (registers the op)
from .backends.cuda.int4.cuda_backend import et_int4_in_cuda_backend
from .backends.cuda.int4.limits import (
    DEFAULT_MATVEC_MAX_M,
    DispatchLimitError,
    get_matvec_max_m,
    matvec_max_m,
)
from .backends.cuda.int4.packing import PackedInt4, pack_int4, unpack_int4
from .backends.cuda.int4.reference import w4a8_reference
from .passes.rewrite_int4 import (
    Int4LinearDecision,
    explain_int4_linears,
    rewrite_int4_linears,
)

__all__ = [
    "DEFAULT_MATVEC_MAX_M",
    "SHIM_GEMM_MAX_M",
    "DispatchLimitError",
    "Int4LinearDecision",
    "PackedInt4",
    "et_int4_in_cuda_backend",
    "explain_int4_linears",
    "get_matvec_max_m",
    "matvec_max_m",
    "pack_int4",
    "rewrite_int4_linears",
    "unpack_int4",
    "w4a8_reference",
]


def __getattr__(name: str) -> int:
    # SHIM_GEMM_MAX_M belongs to the built library, so reading it loads the library (PEP 562).
    if name == "SHIM_GEMM_MAX_M":
        return _limits.shim_gemm_max_m()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
