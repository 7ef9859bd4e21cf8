"""The runner tooling on CPU: the build script's checks and the runner command line.

The build itself and the runs are GPU work (tests/test_runner_e2e.py, bench/gpu_run.sh runner*).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from et_int4.runtime.runner import runner_command, runner_env

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "tools" / "build_executor_runner.sh"
SUBMODULES = ("third-party/flatbuffers", "third-party/flatcc", "third-party/gflags",
              "third-party/json", "backends/xnnpack/third-party/FXdiv")


def fake_tree(root: Path, version: str, submodules=SUBMODULES) -> Path:
    tree = root / "executorch"
    tree.mkdir()
    (tree / "version.txt").write_text(version + "\n")
    for sub in submodules:
        (tree / sub).mkdir(parents=True)
        (tree / sub / "CMakeLists.txt").write_text("")
    return tree


def build(tree, tmp_path, **env):
    return subprocess.run(["bash", str(BUILD_SCRIPT), str(tree), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "BUILD_DIR": str(tmp_path / "build"), **env})


@pytest.mark.parametrize("version", ["1.2.0", "1.1.0", "0.7.0"])
def test_build_refuses_a_tree_older_than_1_3(tmp_path, version):
    result = build(fake_tree(tmp_path, version), tmp_path)
    assert result.returncode != 0
    assert f"is ExecuTorch {version}; the runner needs >= 1.3" in result.stderr
    assert not (tmp_path / "build").exists()


def test_build_names_missing_submodules(tmp_path):
    result = build(fake_tree(tmp_path, "1.4.1", submodules=SUBMODULES[:2]), tmp_path)
    assert result.returncode != 0
    assert "third-party/gflags is empty" in result.stderr
    assert "submodule update --init --recursive" in result.stderr


def test_build_refuses_a_folder_that_is_no_executorch_tree(tmp_path):
    result = build(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "has no version.txt: not an ExecuTorch source tree" in result.stderr


def test_build_warns_when_the_tree_is_not_the_installed_release(tmp_path):
    # 9.9.9 is no installed executorch; the build stops at the missing cmake, after the warning.
    result = build(fake_tree(tmp_path, "9.9.9"), tmp_path, CMAKE=str(tmp_path / "no-cmake"))
    assert result.returncode != 0
    assert "WARNING: this tree is ExecuTorch 9.9.9" in result.stderr
    assert "Export with\n  executorch==9.9.9" in result.stderr
    assert "no cmake" in result.stderr


def test_runner_command_preloads_for_the_runner_alone():
    command = runner_command(Path("/r/executor_runner"), ["--method_name=m"],
                             preload=Path("/lib/libet_int4.so"), prefix=["compute-sanitizer"])
    assert command == ["compute-sanitizer", "env", "LD_PRELOAD=/lib/libet_int4.so",
                       "/r/executor_runner", "--method_name=m"]
    assert runner_command(Path("r"), ["--x"]) == ["r", "--x"]


def test_runner_env_drops_ld_preload(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/lib.so")
    assert "LD_PRELOAD" not in runner_env()
