"""libet_int4: finding, loading and calling the shim library from a PyTorch process.

The library leaves the ``aoti_torch_*`` functions undefined; they resolve against whatever process
loads it (libtorch here, ExecuTorch's CUDA runtime inside ``executor_runner``). ``load()`` therefore
makes libtorch's symbols global before opening it, and opens it ``RTLD_GLOBAL`` so that AOTInductor
code compiled against ``aoti_torch_cuda_et_int4_plain_mm`` finds it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .aoti import c_shim_name

__all__ = [
    "ShimError",
    "library_path",
    "load",
    "plain_mm",
    "shim_gemm_max_m",
    "shim_gemm_max_m_bound",
]

LIBRARY_ENV = "ET_INT4_LIBRARY"
_LIBRARY_NAME = "libet_int4.so"
_HANDLE = ctypes.c_void_p


class ShimError(RuntimeError):
    """libet_int4 could not be loaded, or a call into it returned an error (the shim's own message)."""


def library_path() -> Path | None:
    """The shim library to load (for ``LD_PRELOAD`` too), or None when none is built.

    ``$ET_INT4_LIBRARY`` overrides the installed one (a library built with other options).
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        # Absolute: dlopen would look a bare name up on the library path, not in the working folder.
        path = Path(override).absolute()
        if not path.is_file():
            raise ShimError(_override_error(override, "no such file"))
        return path
    # A wheel installs the library next to this file; an editable install keeps this file in the
    # source tree and the library under site-packages, so look through every package location.
    for location in __spec__.submodule_search_locations or ():
        candidate = Path(location) / _LIBRARY_NAME
        if candidate.is_file():
            return candidate
    return None


def _override_error(override: str, reason: str) -> str:
    return (f"${LIBRARY_ENV}={override} does not load ({reason}): it must be the path of a built "
            f"{_LIBRARY_NAME} (e.g. build/<wheel tag>/{_LIBRARY_NAME} after `pip install "
            f"--no-build-isolation -e .`); fix the path, or unset {LIBRARY_ENV} to use the installed one")


@functools.cache
def _libtorch() -> ctypes.CDLL:
    """libtorch, reopened RTLD_GLOBAL: ctypes binds immediately and `import torch` opened it local."""
    lib_dir = Path(torch.__file__).parent / "lib"
    if torch.version.cuda and (lib_dir / "libtorch_cuda.so").is_file():
        ctypes.CDLL(str(lib_dir / "libtorch_cuda.so"), mode=os.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(lib_dir / "libtorch_cpu.so"), mode=os.RTLD_GLOBAL)
    lib.aoti_torch_delete_tensor_object.argtypes = [_HANDLE]
    lib.aoti_torch_delete_tensor_object.restype = ctypes.c_int32
    return lib


_ENTRY_ARGTYPES = [_HANDLE, _HANDLE, _HANDLE, _HANDLE, ctypes.c_int64, ctypes.c_int64,
                   ctypes.POINTER(_HANDLE)]


@functools.cache
def load() -> ctypes.CDLL:
    """Open the shim library once per process; raises if none is built."""
    path = library_path()
    if path is None:
        raise ShimError(
            f"{_LIBRARY_NAME} is not built: reinstall et-int4 with "
            "`pip install --no-build-isolation .` (needs cmake and a C++ compiler; nvcc for CUDA), "
            f"or point ${LIBRARY_ENV} at a built library"
        )
    _libtorch()
    try:
        lib = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
        entries = [getattr(lib, c_shim_name(device)) for device in ("cpu", "cuda")]
        limits = (lib.et_int4_shim_gemm_max_m, lib.et_int4_shim_gemm_max_m_bound)
    except (OSError, AttributeError) as error:  # not a library, or another library than ours
        override = os.environ.get(LIBRARY_ENV)
        raise ShimError(_override_error(override, str(error)) if override else
                        f"{path} does not load ({error}); reinstall et-int4 with "
                        f"`pip install --no-build-isolation .`") from None
    for fn in entries:
        fn.argtypes = _ENTRY_ARGTYPES
        fn.restype = ctypes.c_int32
    for fn in limits:
        fn.restype = ctypes.c_int64
    lib.et_int4_last_error.restype = ctypes.c_char_p
    return lib


@functools.cache
def shim_gemm_max_m() -> int:
    """``SHIM_GEMM_MAX_M`` of the library :func:`load` opens (set by CMake when it was built)."""
    return int(load().et_int4_shim_gemm_max_m())


@functools.cache
def shim_gemm_max_m_bound() -> int:
    """The largest ``SHIM_GEMM_MAX_M`` that any build accepts (CMakeLists.txt; CMake refuses more)."""
    return int(load().et_int4_shim_gemm_max_m_bound())


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_pointer.restype = ctypes.c_void_p
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_new.restype = ctypes.py_object


@contextlib.contextmanager
def tensor_handles(tensors: list) -> Iterator[list]:
    """New AOTI handles for ``tensors`` (None gives a null handle), deleted on exit."""
    present = [t for t in tensors if t is not None]
    capsules = iter(torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(present))
    handles = [None if t is None else _capsule_pointer(next(capsules), None) for t in tensors]
    try:
        yield handles
    finally:
        for h in handles:
            if h is not None:
                _libtorch().aoti_torch_delete_tensor_object(h)


def call_entry(device: str, handles: list, group_size: int, max_m: int):
    """Call ``aoti_torch_<device>_et_int4_plain_mm`` on raw AOTI handles (None for a null handle).

    Returns ``(code, output_tensor_or_None, message)``; for the ABI tests, which pass bad handles.
    """
    lib = load()
    out = _HANDLE()
    code = getattr(lib, c_shim_name(device))(
        *handles, ctypes.c_int64(group_size), ctypes.c_int64(max_m), ctypes.byref(out))
    if code != 0:
        return code, None, lib.et_int4_last_error().decode()
    result = torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(_capsule_new(out.value, None, None))
    return code, result, ""


def plain_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             group_size: int, max_m: int) -> torch.Tensor:
    """Run the shim's entry point for ``x.device`` on tensors: the eager path of the op."""
    with tensor_handles([x, qdata, scale, zero]) as handles:
        code, result, message = call_entry(x.device.type, handles, group_size, max_m)
    if code != 0:
        raise ShimError(message or f"et_int4 shim failed with code {code}")
    return result
