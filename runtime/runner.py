"""Command lines and environment for ExecuTorch's executor_runner (tools/build_executor_runner.sh).

The runner runs without PyTorch, but needs the CUDA 13 runtime (libcudart.so.13), which the CUDA
torch wheel brings in ``nvidia/cu13/lib``; and libet_int4.so, preloaded or linked in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["runner_command", "runner_env"]


def runner_env() -> dict[str, str]:
    """This process's environment with torch's CUDA 13 libraries on ``LD_LIBRARY_PATH`` and no
    ``LD_PRELOAD`` (``runner_command`` preloads for the runner alone)."""
    import torch

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    cu13 = Path(torch.__file__).parents[1] / "nvidia" / "cu13" / "lib"
    if cu13.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cu13), env.get("LD_LIBRARY_PATH")]))
    return env


def runner_command(runner: Path, flags: Sequence[str], *, preload: Path | None = None,
                   prefix: Sequence[str] = ()) -> list[str]:
    """``prefix`` (a tool such as compute-sanitizer), then the runner with ``flags``, with
    ``preload`` in its ``LD_PRELOAD`` (set through ``env`` so that the tool does not load it)."""
    preloading = ["env", f"LD_PRELOAD={preload}"] if preload else []
    return [*prefix, *preloading, str(runner), *flags]
