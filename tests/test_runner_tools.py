"""The runner tooling on CPU: the build script's checks, the runner command line, the latency parser.

The build itself and the runs are GPU work (tests/test_runner_e2e.py, bench/gpu_run.sh runner*).
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_build_keeps_a_folder_that_is_no_runner_build(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = build(fake_tree(tmp_path, "1.4.1"), tmp_path)
    assert result.returncode != 0
    assert "holds files but no executor_runner" in result.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_runner_command_preloads_for_the_runner_alone():
    command = runner_command(Path("/r/executor_runner"), ["--method_name=m"],
                             preload=Path("/lib/libet_int4.so"), prefix=["compute-sanitizer"])
    assert command == ["compute-sanitizer", "env", "LD_PRELOAD=/lib/libet_int4.so",
                       "/r/executor_runner", "--method_name=m"]
    assert runner_command(Path("r"), ["--x"]) == ["r", "--x"]


def test_runner_env_drops_ld_preload(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/lib.so")
    assert "LD_PRELOAD" not in runner_env()


def fake_runner(tmp_path: Path, times_ms: list[float], logging: bool = True) -> Path:
    """A stand-in for executor_runner that logs the given per-run times as the real one does, and
    the CUDA backend's capture line for `--cuda_graph_methods`."""
    lines = "".join(f'echo "I 00:00:01.000 executorch:executor_runner.cpp:700] Iteration {i + 1} '
                    f'of {len(times_ms)}: {t} ms" >&2\n' for i, t in enumerate(times_ms))
    lines += ('case "$*" in *--cuda_graph_methods*) echo "I 00:00:01.000 executorch:'
              'cuda_backend.cpp:751] CUDA graph: captured and instantiated for \'a\'" >&2;; esac\n')
    runner = tmp_path / "executor_runner"
    runner.write_text("#!/bin/sh\n" + (lines if logging else "") + "exit 0\n")
    runner.chmod(0o755)
    return runner


def latency(runner: Path, n: int, *extra: str):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "runner_latency.py"), "--runner", str(runner),
         "--pte", "p.pte", "--ptd", "p.ptd", "--methods", "a,b", "--num-executions", str(n), *extra],
        capture_output=True, text=True, timeout=60)


def test_runner_latency_leaves_out_the_warmup_runs(tmp_path):
    times = [50.0] * 5 + [1.0, 2.0, 3.0, 4.0, 100.0]  # five warm-up runs, then the timed ones
    result = latency(fake_runner(tmp_path, times), len(times), "--ratio", "a/b")
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| executor")]
    assert [[cell.strip() for cell in r[2:8]] for r in rows] == [
        ["a", "3.000", "1.000", "100.000", "5", "no"], ["b", "3.000", "1.000", "100.000", "5", "no"]]
    assert "a / b = 1.00" in result.stdout


def test_runner_latency_reports_a_captured_cuda_graph(tmp_path):
    result = latency(fake_runner(tmp_path, [1.0] * 10), 10, "--", "--cuda_graph_methods=a")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| executor")]
    assert rows and all(row.endswith("| yes |") for row in rows)


def test_runner_latency_needs_the_runners_log(tmp_path):
    result = latency(fake_runner(tmp_path, [1.0] * 10, logging=False), 10)
    assert result.returncode != 0
    assert "EXECUTORCH_ENABLE_LOGGING=ON" in result.stderr


# Stands in for python3 and compute-sanitizer: answers the script's one-line queries, records every
# other command line as its arguments split by \x1f, one command a line.
RECORDER = """#!/bin/bash
case "$1 $2" in "-m pip") exit 0;; esac
if [ "$1" = -c ]; then
  case "$2" in *library_path*) echo "$FAKE_LIBRARY";; *importlib.metadata*) echo "versions";; *) echo;; esac
  exit 0
fi
{ printf '%s\\x1f' "${0##*/}" "$@"; echo; } >> "$CALLS"
"""


def test_gpu_run_passes_paths_with_spaces_as_single_arguments(tmp_path):
    fakes, work, runners, out = (tmp_path / name for name in ("fakes", "w ork", "run ners", "o ut"))
    for folder in (fakes, work, runners):
        folder.mkdir()
    for name in ("python3", "compute-sanitizer"):
        (fakes / name).write_text(RECORDER)
        (fakes / name).chmod(0o755)
    library, calls = tmp_path / "li b" / "libet_int4.so", tmp_path / "calls"
    steps = ["runner_latency", "runner_sanitizer", "runner_ratio", "eagle_llama_time"]
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_run.sh"), str(out), *steps], cwd=work, capture_output=True, text=True,
        timeout=60, env={**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}", "ET_INT4_RUNNER_DIR": str(runners),
                         "FAKE_LIBRARY": str(library), "CALLS": str(calls)})
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [line.split("\x1f")[:-1] for line in calls.read_text().splitlines()]

    def after(flag):
        return {c[c.index(flag) + 1] for c in commands if flag in c}

    eagle = work / "out" / "runner-eagle"
    assert after("--runner") == {f"{runners}/{name}" for name in ("executor_runner", "executor_runner_et_int4",
                                                                   "eagle_runner")}
    assert after("--preload") == {str(library)}
    assert after("--pte") == {f"{eagle}/eagle.pte", "out/runner-llama", "out/runner-llama/verify_decode.pte"}
    sanitized = [c for c in commands if c[0] == "compute-sanitizer"]
    assert [c[c.index(f"{runners}/executor_runner") - 1:] for c in sanitized] == [
        [f"LD_PRELOAD={library}", f"{runners}/executor_runner", f"--model_path={eagle}/eagle.pte",
         f"--data_path={eagle}/aoti_cuda_blob.ptd", f"--method_name={method}", "--print_output=none"]
        for method in ("prefill", "target_verify", "draft_decode")]
    assert (out / "eagle_llama.md").is_file()
