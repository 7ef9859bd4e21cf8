"""The ExecuTorch harness of bench/bench_int4_mm.py on CPU: the key its build is cached under.

Building and running it is GPU work (bench/gpu_run.sh bench).
"""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
harness_build = runpy.run_path(str(BENCH / "bench_int4_mm.py"))["harness_build"]


@pytest.fixture
def harness(tmp_path) -> Path:
    copy = tmp_path / "executorch_harness"
    shutil.copytree(BENCH / "executorch_harness", copy)
    return copy


@pytest.fixture
def header(tmp_path) -> Path:
    path = tmp_path / "int4_plain_mm.cuh"
    path.write_text("// ExecuTorch's kernels\n")
    return path


def key(header: Path, harness: Path) -> str:
    return harness_build(header, harness)[1]


def input_file(edit: str, header: Path, harness: Path) -> Path:
    stub = min((harness / "stubs").rglob("*.h"))
    return {"header": header, "harness.cu": harness / "harness.cu", "a stub": stub,
            "a new stub": stub.with_name("new.h")}[edit]


@pytest.mark.parametrize("edit", ["header", "harness.cu", "a stub", "a new stub"])
def test_editing_any_build_input_changes_the_key(edit, header, harness):
    before = key(header, harness)
    with input_file(edit, header, harness).open("a") as file:
        file.write("// edited\n")
    assert key(header, harness) != before


def test_the_key_stays_without_edits_and_ignores_the_readme(header, harness):
    before = key(header, harness)
    (harness / "README.md").write_text("reworded\n")
    assert key(header, harness) == before


def test_the_command_reads_the_header_and_the_stubs(header, harness):
    command, _ = harness_build(header, harness)
    assert str(harness / "harness.cu") in command and str(harness / "stubs") in command
    assert any(str(header) in arg for arg in command)
