"""The C ABI of libet_int4 on the CPU: symbols, limits, validation and the reference path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import et_int4
import pytest
import torch
from et_int4 import runtime
from et_int4.backends.cuda.int4.packing import untile_weights
from et_int4.backends.cuda.int4.reference import check_w4a8_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_within_one_rounding, random_operands

REPO = Path(__file__).resolve().parents[1]
ALLOWED_SYMBOLS = REPO / "runtime" / "aoti_allowed_symbols.txt"
AOTI_HEADER = REPO / "runtime" / "aoti_abi.h"


@pytest.fixture(scope="module")
def built_library() -> Path:
    # Looked up when a test runs, not at import: a bad $ET_INT4_LIBRARY fails the tests with its message.
    path = runtime.library_path()
    if path is None:
        pytest.skip("libet_int4 is not built (pip install --no-build-isolation .)")
    return path


requires_library = pytest.mark.usefixtures("built_library")


def small_operands():
    return random_operands(2, 32, 64, 32, generator=torch.Generator().manual_seed(0))


def call_abi(device, tensors, group_size, max_m):
    with runtime.tensor_handles(tensors) as handles:
        return runtime.call_entry(device, handles, group_size, max_m)


def allowed_aoti_functions() -> set[str]:
    lines = (line.split("#")[0].strip() for line in ALLOWED_SYMBOLS.read_text().splitlines())
    return {line for line in lines if line}


def test_aoti_header_declares_only_allowed_functions():
    declared = set(re.findall(r"\b(aoti_torch_\w+)\(", AOTI_HEADER.read_text()))
    assert declared, f"{AOTI_HEADER} should declare the AOTI functions the library calls"
    assert declared <= allowed_aoti_functions(), \
        f"not defined by every ExecuTorch CUDA runtime: {sorted(declared - allowed_aoti_functions())}"


@requires_library
def test_library_calls_only_aoti_functions_every_executorch_runtime_has():
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(runtime.library_path())],
                        capture_output=True, text=True, check=True).stdout
    used = {line.split()[-1] for line in nm.splitlines() if line.split()[-1].startswith("aoti_torch_")}
    assert used, "the library should call the host's AOTI functions"
    assert used <= allowed_aoti_functions(), \
        f"not defined by every ExecuTorch CUDA runtime: {sorted(used - allowed_aoti_functions())}"


@requires_library
def test_library_exports_the_abi():
    nm = subprocess.run(["nm", "-D", "--defined-only", str(runtime.library_path())],
                        capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines()}
    assert {"aoti_torch_cuda_et_int4_plain_mm", "aoti_torch_cpu_et_int4_plain_mm",
            "et_int4_shim_gemm_max_m", "et_int4_shim_gemm_max_m_bound", "et_int4_last_error"} <= exported


LOAD_CHECK = "from et_int4 import runtime; runtime.load(); print('loaded', runtime.shim_gemm_max_m())"


@requires_library
@pytest.mark.parametrize("override", ["bare-name", "bare-name-elsewhere", "not-a-library", "another-library",
                                      "missing"])
def test_library_override_loads_or_says_what_it_expected(override, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    value = {"bare-name": "libet_int4.so", "bare-name-elsewhere": "libet_int4.so",
             "not-a-library": str(tmp_path / "libet_int4.so"), "missing": str(tmp_path / "nowhere.so"),
             "another-library": str(Path(torch.__file__).parent / "lib" / "libc10.so")}[override]
    if override == "bare-name":  # a bare name is a path relative to the working folder
        (cwd / "libet_int4.so").write_bytes(runtime.library_path().read_bytes())
    if override == "not-a-library":
        (tmp_path / "libet_int4.so").write_text("not an ELF file")
    env = dict(os.environ, ET_INT4_LIBRARY=value)
    result = subprocess.run([sys.executable, "-c", LOAD_CHECK], cwd=cwd, env=env, capture_output=True, text=True)
    if override == "bare-name":
        assert result.returncode == 0 and "loaded" in result.stdout, result.stderr
        return
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "ShimError" in last, result.stderr
    assert f"$ET_INT4_LIBRARY={value}" in last and "a built libet_int4.so" in last, last
    assert "unset ET_INT4_LIBRARY" in last, last


def test_modules_reading_the_library_collect_without_it(tmp_path):
    # The library's limits are read inside tests: a missing library fails those tests with the loader's
    # message instead of failing the whole module at collection.
    modules = [str(Path(__file__).parent / name) for name in ("test_shim_abi.py", "test_export_eagle.py")]
    env = dict(os.environ, ET_INT4_LIBRARY=str(tmp_path / "nowhere.so"))
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *modules], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@requires_library
def test_library_serves_every_m_up_to_its_limit_and_no_more():
    limit = et_int4.SHIM_GEMM_MAX_M
    operands = random_operands(limit, 32, 64, 32, generator=torch.Generator().manual_seed(limit))
    code, out, message = call_abi("cpu", list(operands), 32, limit)
    assert code == 0, message
    assert_within_one_rounding(out, et_int4.w4a8_reference(*operands, 32))
    code, out, message = call_abi("cpu", list(operands), 32, limit + 1)
    assert code != 0 and out is None
    assert f"SHIM_GEMM_MAX_M = {limit}, got {limit + 1}" in message


@requires_library
@pytest.mark.parametrize("zeros", ["group", "row", "symmetric"])
@pytest.mark.parametrize("m,n,k,group_size", [(1, 64, 256, 32), (3, 96, 4224, 96), (8, 160, 512, 256), (5, 32, 32, 32)])
def test_cpu_entry_point_matches_python_reference(m, n, k, group_size, zeros):
    operands = random_operands(m, n, k, group_size, zeros=zeros, generator=torch.Generator().manual_seed(m * n + k))
    code, out, message = call_abi("cpu", list(operands), group_size, et_int4.SHIM_GEMM_MAX_M)
    assert code == 0, message
    assert_within_one_rounding(out, et_int4.w4a8_reference(*operands, group_size))


@requires_library
def test_symmetric_zero_other_than_8_is_refused():
    # [N/32, 1] declares symmetric weights, whose every entry is 8: another value is no zero point it can mean.
    gen = torch.Generator().manual_seed(5)
    x, qdata, scale, zero = random_operands(2, 96, 256, 32, zeros="symmetric", generator=gen)
    zero[2] = 9
    code, out, message = call_abi("cpu", [x, qdata, scale, zero], 32, et_int4.SHIM_GEMM_MAX_M)
    assert code != 0 and out is None
    assert "zero: the symmetric layout [N/32, 1] holds 8 in every entry, got 9 at tile 2" in message, message
    with pytest.raises(ValueError, match=r"zero of the symmetric layout \[N/32, 1\] must be 8 .* \[8, 9\]"):
        et_int4.w4a8_reference(x, qdata, scale, zero, 32)


@requires_library
def test_no_rows_give_an_empty_output():
    x, qdata, scale, zero = random_operands(0, 64, 128, 32, generator=torch.Generator().manual_seed(1))
    code, out, message = call_abi("cpu", [x, qdata, scale, zero], 32, 4)
    assert code == 0, message
    assert (out.dtype, tuple(out.shape), out.device.type) == (torch.bfloat16, (0, 64), "cpu")


@requires_library
@pytest.mark.parametrize("case", ["zero", "above-this-build", "above-every-build"])
def test_max_m_messages_suggest_only_builds_cmake_accepts(case):
    limit, bound = et_int4.SHIM_GEMM_MAX_M, runtime.shim_gemm_max_m_bound()
    max_m, rebuild = {"zero": (0, None), "above-this-build": (limit + 1, limit + 1),
                      "above-every-build": (bound + 1, None)}[case]
    code, _, message = call_abi("cpu", list(small_operands()), 32, max_m)
    assert code != 0 and message.startswith("et_int4_plain_mm: max_m: expected"), message
    if rebuild is not None and rebuild <= bound:
        assert f"rebuild with -DET_INT4_SHIM_GEMM_MAX_M={rebuild}" in message, message
    else:
        assert "rebuild" not in message, message


@requires_library
def test_cmake_refuses_a_limit_above_the_bound(tmp_path):
    bound = runtime.shim_gemm_max_m_bound()
    result = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path), f"-DET_INT4_SHIM_GEMM_MAX_M={bound + 1}",
                             "-DET_INT4_WITH_CUDA=OFF"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"ET_INT4_SHIM_GEMM_MAX_M must be an integer in 1..{bound}, got '{bound + 1}'" in result.stderr


@requires_library
def test_null_output_pointer_is_refused():
    with runtime.tensor_handles(list(small_operands())) as handles:
        fn = runtime.load().aoti_torch_cpu_et_int4_plain_mm
        assert fn(*handles, 32, 4, None) != 0
    assert "ret0" in runtime.load().et_int4_last_error().decode()


@requires_library
def test_cuda_entry_point_refuses_cpu_tensors():
    code, out, message = call_abi("cuda", list(small_operands()), 32, 4)
    assert code != 0 and out is None
    assert "cuda" in message


def _old_layout_case():
    """et-int4 0.1's row-major weights: qdata [N, K/2], scale and zero [N, K/gs]."""
    x, qdata, scale, zero = small_operands()
    return [x, *untile_weights(qdata, scale, zero)], 32


def _old_qdata_case():
    """Only qdata row-major [N, K/2]; scale and zero tiled."""
    x, qdata, scale, zero = small_operands()
    return [x, untile_weights(qdata, scale, zero)[0], scale, zero], 32


def _k_case(k, m=1, device="cpu"):
    def case():
        x = torch.randn(m, k, dtype=torch.bfloat16)
        qdata = torch.zeros(1, 16 * k, dtype=torch.uint8)
        tensors = [x, qdata, torch.ones(1, 32, dtype=torch.bfloat16), torch.zeros(1, 32, dtype=torch.int8)]
        return [t.to(device) for t in tensors], 32
    return case


_K0_PY = r"self must be \[M, K\] with K >= 32, got K=0"
_K0_ABI = r"^et_int4_plain_mm: self: expected K >= 32 .*got K = 0$"
_OLD_PY = r"qdata has shape \(32, 32\).*row-major.*re-export"
_OLD_ABI = r"^et_int4_plain_mm: qdata: expected the tiled layout.*got shape \[32, 32\].*row-major.*re-export"


@requires_library
@pytest.mark.parametrize("case, python_pattern, abi_pattern", [
    # (case, pattern of the Python check's ValueError, pattern of the C ABI's ShimError)
    pytest.param(_old_layout_case, _OLD_PY, _OLD_ABI, id="old-row-major-layout"),
    pytest.param(_old_qdata_case, _OLD_PY, _OLD_ABI, id="old-row-major-qdata"),
    pytest.param(_k_case(0), _K0_PY, _K0_ABI, id="k-zero"),
    # A fresh torch.empty(2, 0) has strides (1, 1): the shim must not call it non-contiguous.
    pytest.param(_k_case(0, m=2), _K0_PY, _K0_ABI, id="k-zero-m2"),
    pytest.param(_k_case(16, m=2), r"self must be \[M, K\] with K >= 32, got K=16",
                 r"^et_int4_plain_mm: self: expected K >= 32 .*got K = 16$", id="k-16"),
    # The CUDA entry point refuses it before any launch, with the same message.
    pytest.param(_k_case(0, device="cuda"), _K0_PY, _K0_ABI, id="k-zero-cuda", marks=pytest.mark.cuda),
    pytest.param(_k_case(0, m=2, device="cuda"), _K0_PY, _K0_ABI, id="k-zero-m2-cuda", marks=pytest.mark.cuda),
])
def test_python_check_and_c_abi_refuse_alike(case, python_pattern, abi_pattern):
    tensors, group_size = case()
    with pytest.raises(ValueError, match=python_pattern):
        check_w4a8_args(*tensors, group_size, 4)
    with pytest.raises(runtime.ShimError, match=abi_pattern):
        runtime.plain_mm(*tensors, group_size, 4)


DTYPES = {
    "self": [torch.bfloat16, torch.float32, torch.float16],
    "qdata": [torch.uint8, torch.int8, torch.int32],
    "scale": [torch.bfloat16, torch.float32],
    "zero": [torch.int8, torch.uint8],
}
ARGS = ("self", "qdata", "scale", "zero")
WEIGHTS = {"qdata", "scale", "zero"}


@st.composite
def abi_calls(draw):
    """Arguments to the C entry point, half of them well formed, half slightly wrong, with the
    names of the arguments the ABI's rules say are wrong."""
    well_formed = draw(st.booleans())
    limit = et_int4.SHIM_GEMM_MAX_M
    if well_formed:
        k = draw(st.sampled_from([32, 64, 96, 128, 256]))
        max_m = draw(st.integers(1, limit))
        m = draw(st.integers(1, max_m))
        tiles = draw(st.integers(1, 3))
        group_size = draw(st.sampled_from([g for g in (32, 64, 96, 128, 256) if k % g == 0]))
    else:
        k = draw(st.sampled_from([0, 16, 32, 64, 96, 128, 256]))
        max_m = draw(st.integers(-1, limit + 2))
        m = draw(st.integers(0, limit + 2))
        tiles = draw(st.integers(0, 3))
        group_size = draw(st.sampled_from([0, 16, 32, 48, 64, 96, 128, 256]))
    groups = k // group_size if group_size else 1
    n = 32 * tiles
    # The tiled layout: N = 32 * qdata.shape[0].
    wanted = {"self": [m, k], "qdata": [tiles, 16 * k], "scale": [tiles, 32 * groups],
              "zero": [tiles, 32 * groups]}
    row_major = {"self": [m, k], "qdata": [n, k // 2], "scale": [n, groups], "zero": [n, groups]}
    tensors, bad, old_qdata = [], set(), False
    null = None if well_formed else draw(st.sampled_from((None,) + ARGS))
    changes = ["none"] if well_formed else \
        ["none"] * 4 + ["rows", "cols", "rank3", "rank1", "dtype", "layout", "row_major"]
    for name in ARGS:
        shape = list(wanted[name])
        change = draw(st.sampled_from(changes))
        dtype = draw(st.sampled_from(DTYPES[name][1:])) if change == "dtype" else DTYPES[name][0]
        if change == "rows":
            shape[0] += draw(st.sampled_from([-1, 1]))
        elif change == "cols":
            shape[1] += draw(st.sampled_from([-1, 1]))
        elif change == "rank3":
            shape = [1] + shape
        elif change == "rank1":
            shape = [shape[0] * shape[1]]
        elif change == "row_major":
            shape = list(row_major[name])  # et-int4 0.1's layout (self is as before)
        shape = [max(s, 0) for s in shape]
        if name == "self" and change == "rows":
            m = wanted["self"][0] = shape[0]  # another M, valid or not by the rule on M below
        if change == "layout" and len(shape) == 2:
            t = torch.randint(0, 16, shape[::-1]).to(dtype).t()
        else:
            t = torch.randint(0, 16, shape).to(dtype)
        if dtype.is_floating_point:
            t = t * 0.01 + 0.005
        if name == null:
            t = None
        tensors.append(t)
        if t is None or list(t.shape) != wanted[name] or t.dtype not in DTYPES[name][:2 if name == "qdata" else 1] \
                or not t.is_contiguous():
            bad.add(name)
        if change == "rows" and name != "self":
            # N is 32 * qdata's row (tile) count: a disagreement on it may be reported on any of the three.
            bad |= WEIGHTS
        if change == "cols" and name == "self":
            # K comes from self: a K that disagrees with the weights may be reported on the group
            # size or on any weight.
            bad |= {"group_size"} | WEIGHTS
        if name == "qdata" and t is not None and t.dim() == 2 and t.shape[1] == k // 2:
            old_qdata = True
    if not 1 <= max_m <= limit:
        bad.add("max_m")
    if m > max_m:
        bad |= {"self", "max_m"}
    if k < 32:
        bad.add("self")
    if group_size < 32 or group_size % 32 or k % group_size:
        bad |= {"group_size", "scale", "zero"}
    if tiles < 1:
        bad |= WEIGHTS
    assert not (well_formed and bad)
    return tensors, group_size, max_m, bad, old_qdata


@requires_library
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=abi_calls())
def test_abi_refuses_bad_input_and_computes_good_input(call):
    tensors, group_size, max_m, bad, old_qdata = call
    code, out, message = call_abi("cpu", tensors, group_size, max_m)
    if not bad:
        assert code == 0, message
        x, qdata, scale, zero = tensors
        ref = et_int4.w4a8_reference(x, qdata.view(torch.uint8), scale, zero, group_size)
        assert_within_one_rounding(out, ref)
        return
    assert code != 0 and out is None
    named = re.match(r"et_int4_plain_mm: (\w+)", message)
    assert named and named.group(1) in bad, f"{message!r} names none of {sorted(bad)}"
    if "re-export" in message:
        # Only for a qdata in the row-major shape [N, K/2] of et-int4 0.1.
        assert old_qdata and named.group(1) == "qdata" and "got shape" in message, message
    else:
        assert "expected" in message and "got" in message


# Run with ET_INT4_LIBRARY naming a library CMake built with SHIM_GEMM_MAX_M = LIMIT (argv[1]).
LIMIT_CHECK = textwrap.dedent(
    """
    import sys, pytest, torch, et_int4
    from et_int4 import runtime
    from et_int4.backends.cuda.int4.packing import tile_weights
    limit = int(sys.argv[1])
    assert et_int4.SHIM_GEMM_MAX_M == limit, et_int4.SHIM_GEMM_MAX_M
    with pytest.raises(et_int4.DispatchLimitError, match=f"SHIM_GEMM_MAX_M={limit}"):
        et_int4.matvec_max_m(limit + 1)
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    model = torch.nn.Linear(64, 32, bias=False).bfloat16()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    ep = torch.export.export(model, (torch.randn(limit, 64).bfloat16(),))
    with pytest.raises(et_int4.DispatchLimitError, match="SHIM_GEMM_MAX_M"):
        et_int4.rewrite_int4_linears(ep, matvec_max_m=limit + 1)
    assert [d.routed for d in et_int4.explain_int4_linears(ep, matvec_max_m=limit)] == [True]
    x = torch.randn(limit, 64).bfloat16()
    q, s, z = tile_weights(torch.randint(0, 256, (32, 32), dtype=torch.uint8), torch.rand(32, 2).bfloat16(),
                           torch.randint(0, 16, (32, 2), dtype=torch.int8))
    with runtime.tensor_handles([x, q, s, z]) as handles:
        code, out, message = runtime.call_entry("cpu", handles, 32, limit + 1)
        assert code != 0 and f"SHIM_GEMM_MAX_M = {limit}," in message, message
        code, out, message = runtime.call_entry("cpu", handles, 32, limit)
        assert code == 0 and out.shape == (limit, 32), message
    print("limit ok")
    """
)


def _configured_limit(build: Path) -> int:
    """SHIM_GEMM_MAX_M as CMake configured ``build``: read back from CMake's cache."""
    cache = subprocess.run(["cmake", "-N", "-L", str(build)], check=True, capture_output=True, text=True).stdout
    values = [line.split("=", 1)[1] for line in cache.splitlines() if line.startswith("ET_INT4_SHIM_GEMM_MAX_M:")]
    assert len(values) == 1, cache
    return int(values[0])


@requires_library
@pytest.mark.slow
@pytest.mark.parametrize("define", [None, 4], ids=["cmake-default", "limit-4"])
def test_library_has_the_limit_cmake_was_configured_with(define, tmp_path):
    """CMake's ET_INT4_SHIM_GEMM_MAX_M (its default, or a -D) reaches the library's checks and Python."""
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(REPO), "-B", str(build), "-DET_INT4_WITH_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    if define is not None:
        configure.append(f"-DET_INT4_SHIM_GEMM_MAX_M={define}")
    subprocess.run(configure, check=True, capture_output=True)
    limit = _configured_limit(build)
    assert define is None or limit == define
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    env = dict(os.environ, ET_INT4_LIBRARY=str(build / "libet_int4.so"))
    result = subprocess.run([sys.executable, "-c", LIMIT_CHECK, str(limit)], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "limit ok" in result.stdout, result.stdout + result.stderr
