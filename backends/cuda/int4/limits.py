"""Dispatch policy: which row counts M the pass routes to ``et_int4_plain_mm``.

Two limits, one rule (docs/ARCHITECTURE.md, "Two limits, one rule"):

* ``MATVEC_MAX_M`` (export time, this module): the largest M the rewrite pass routes to the op.
  The current value lives in a ``ContextVar`` and changes only through :func:`matvec_max_m`,
  so an export that raises it cannot leak the new value into the next one.
* ``SHIM_GEMM_MAX_M`` (build time, CMakeLists.txt): the largest M the shim's kernels handle, read
  from the built library (:func:`shim_gemm_max_m`, on first use) so that Python and C++ can never
  disagree.

``MATVEC_MAX_M <= SHIM_GEMM_MAX_M`` is checked here (:func:`check_matvec_max_m`, the one Python
check of it) and again by the shim at run time.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from ....runtime import shim_gemm_max_m, shim_gemm_max_m_bound

__all__ = [
    "DEFAULT_MATVEC_MAX_M",
    "DispatchLimitError",
    "check_matvec_max_m",
    "get_matvec_max_m",
    "matvec_max_m",
    "rebuild_hint",
    "resolve_matvec_max_m",
    "shim_gemm_max_m",
]

# An export with a dynamic prefill that starts at M = 5 keeps its prefill untouched by default.
DEFAULT_MATVEC_MAX_M: int = 4


def rebuild_hint(n: int) -> str:
    """A clause to append to a fix for ``n`` rows beyond the built library: the rebuild that serves
    them, or, above what any build accepts, that none does (never a build CMake would refuse)."""
    bound = shim_gemm_max_m_bound()
    if n > bound:
        return f" (no build handles more than {bound} rows)"
    return f", or rebuild with `ET_INT4_SHIM_GEMM_MAX_M={n} pip install --no-build-isolation -e .`"


class DispatchLimitError(ValueError):
    """A row count M or a limit that the op, the pass or the shim cannot serve."""


_MATVEC_MAX_M: contextvars.ContextVar[int] = contextvars.ContextVar(
    "et_int4_matvec_max_m", default=DEFAULT_MATVEC_MAX_M
)


def check_matvec_max_m(n: object) -> int:
    """Return ``n`` if it is a valid ``MATVEC_MAX_M`` (an int in ``1..SHIM_GEMM_MAX_M``), else raise."""
    limit = shim_gemm_max_m()
    if isinstance(n, bool) or not isinstance(n, int):
        raise DispatchLimitError(
            f"MATVEC_MAX_M must be an int in [1, SHIM_GEMM_MAX_M={limit}], "
            f"got {n!r} of type {type(n).__name__}"
        )
    if n < 1:
        raise DispatchLimitError(
            f"MATVEC_MAX_M must be at least 1 (M = 1 is a decode step), got {n}; "
            f"pick a value in [1, SHIM_GEMM_MAX_M={limit}]"
        )
    if n > limit:
        raise DispatchLimitError(
            f"MATVEC_MAX_M={n} exceeds SHIM_GEMM_MAX_M={limit}, the largest M the built "
            f"libet_int4 handles: lower MATVEC_MAX_M to at most {limit}{rebuild_hint(n)}"
        )
    return n


def get_matvec_max_m() -> int:
    """The ``MATVEC_MAX_M`` in effect (``DEFAULT_MATVEC_MAX_M`` outside any :func:`matvec_max_m`)."""
    return _MATVEC_MAX_M.get()


def resolve_matvec_max_m(n: int | None) -> int:
    """An explicit per-call limit, checked, or the one in effect when ``n`` is None."""
    return get_matvec_max_m() if n is None else check_matvec_max_m(n)


def matvec_max_m(n: int) -> contextlib.AbstractContextManager[int]:
    """Set ``MATVEC_MAX_M`` to ``n`` inside a ``with`` block; the previous value comes back on exit.

    ``n`` is checked when this is called, before the block runs. Blocks nest, and each thread or
    asyncio task sees its own value.
    """
    return _scoped_matvec_max_m(check_matvec_max_m(n))


@contextlib.contextmanager
def _scoped_matvec_max_m(n: int) -> Iterator[int]:
    token = _MATVEC_MAX_M.set(n)
    try:
        yield n
    finally:
        _MATVEC_MAX_M.reset(token)
