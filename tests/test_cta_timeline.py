"""bench/cta_timeline.py on CPU: its records go into the kernel source as it is now.

Building and running the instrumented kernels is GPU work (`python bench/cta_timeline.py instrument ...`).
"""

from __future__ import annotations

import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tool = runpy.run_path(str(ROOT / "bench" / "cta_timeline.py"))
KERNEL = (ROOT / "backends" / "cuda" / "int4" / "int4_mm.cu").read_text()


def test_every_anchor_is_in_the_kernel_once():
    text = tool["instrumented"](KERNEL)
    # Each kernel records once per CTA, at its one exit (the GEMM's without split K).
    assert text.count("cta_record(q_slot, 1,") == 1
    assert text.count("cta_record(g_slot, 2,") == 1
    assert 'extern "C"' in text and "et_int4_cta_records" in text


def test_a_kernel_without_an_anchor_is_refused_with_the_anchor_named():
    anchor = tool["WAIT"]
    with pytest.raises(SystemExit, match="update EDITS") as error:
        tool["instrumented"](KERNEL.replace(anchor, ""))
    assert repr(anchor) in str(error.value)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_the_instrumented_kernel_compiles(tmp_path):
    source = tmp_path / "backends" / "cuda" / "int4"
    source.mkdir(parents=True)
    kernels = ROOT / "backends" / "cuda" / "int4"
    for header in [*kernels.glob("*.h"), *kernels.glob("*.cuh")]:  # what the kernel includes
        shutil.copy(header, source)
    (source / "int4_mm.cu").write_text(tool["instrumented"](KERNEL))
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "--expt-relaxed-constexpr", "-DET_INT4_SHIM_GEMM_MAX_M=8",
         f"-I{tmp_path}", "-c", str(source / "int4_mm.cu"), "-o", str(tmp_path / "int4_mm.o")],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
