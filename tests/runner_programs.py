"""What the tests of the project's runners share: the skip when no runner is configured, and the
EAGLE program they run, exported and lowered once per test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from et_int4.export import export_eagle as cli
from et_int4.export.export_eagle import ExportOptions


def requires_runner(env: str, runner: str, binary: str):
    """A skip, with the fix as its reason, unless ``$env`` names the runner."""
    return pytest.mark.skipif(not os.environ.get(env),
                              reason=f"no {runner} configured: build one with tools/build_executor_runner.sh "
                                     f"and set ${env} to .runner/{binary}")


def lowered_program(options: ExportOptions, workdir_env: str,
                    tmp_path_factory) -> tuple[dict[str, torch.nn.Module], Path, Path]:
    """The rewritten programs as eager modules (method -> module), and the .pte + .ptd lowered from
    them (kept in ``$workdir_env`` when set, e.g. to time them afterwards)."""
    export = cli.export_eagle(options)
    # The eager modules first: lowering changes the programs it is given (their lifted buffers).
    modules = {method: program.module() for method, program in export.programs.items()}
    workdir = os.environ.get(workdir_env)
    pte, ptd = cli.lower_to_executorch(export.programs, cli.constant_methods(options),
                                       Path(workdir) if workdir else tmp_path_factory.mktemp("eagle"))
    return modules, pte, ptd
