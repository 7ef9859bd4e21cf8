"""The exported EAGLE program under ExecuTorch's own ``executor_runner`` (C++, no PyTorch).

Each method runs in its own runner process on the GPU, from zero KV caches, with inputs from raw
files; its outputs are compared with the rewritten program run eagerly on CPU (the op's reference
numerics). ``$ET_INT4_EXECUTOR_RUNNER`` names the runner (tools/build_executor_runner.sh builds
it); ``executor_runner_et_int4`` next to it, the same runner with libet_int4.so linked in, is
tested too. ``$ET_INT4_RUNNER_PREFIX`` runs every runner under a tool, e.g.
``compute-sanitizer --error-exitcode=9``.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import et_int4.runtime
import pytest
import torch
from et_int4.export.export_eagle import ExportOptions
from et_int4.runtime.runner import runner_command, runner_env
from numerics import rel_error
from runner_programs import lowered_program, requires_runner

RUNNER_ENV = "ET_INT4_EXECUTOR_RUNNER"
PREFIX_ENV = "ET_INT4_RUNNER_PREFIX"
WORKDIR_ENV = "ET_INT4_RUNNER_WORKDIR"
LINKED_RUNNER = "executor_runner_et_int4"
MISSING_SYMBOL = "undefined symbol: aoti_torch_cuda_et_int4_plain_mm"

pytestmark = [pytest.mark.cuda, requires_runner(RUNNER_ENV, "executor_runner", "executor_runner")]

# With the logits as a third output, so that the lm_head's numerics are compared too.
OPTIONS = ExportOptions(config="tiny", chain_len=7, matvec_max_m=8, max_seq_len=64, logits=True)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rel_error: float  # of the features and logits, against the CPU run of the rewritten program
    argmax: float  # least fraction of positions whose greedy token (output 0) agrees


# Measured on an H100 (ExecuTorch 1.4.1, 2026-11-26): target_verify 8.4e-3, prefill 3.9e-3,
# draft_decode up to 6.7e-3 (bit-exact only before the tiled kernel, whose fp32 summation order is
# not the CPU reference's); AOTI's fusions around the op differ from eager PyTorch's too.
TOLERANCES = {
    "prefill": Tolerance(2e-2, 0.9),
    "target_verify": Tolerance(3e-2, 0.9),
    "draft_decode": Tolerance(2e-2, 1.0),
}


def _inputs(method: str) -> tuple[torch.Tensor, ...]:
    """Fresh random inputs; the runner takes dynamic dimensions at their maximum."""
    args = OPTIONS.model_args
    n = {"prefill": args.max_seq_len, "target_verify": OPTIONS.chain_len + 1, "draft_decode": 1}[method]
    tokens, positions = torch.randint(0, args.vocab_size, (1, n)), torch.arange(n)
    if method != "draft_decode":
        return tokens, positions
    return (tokens, positions + 5, torch.randn(1, 1, 3 * args.dim, dtype=torch.bfloat16),
            torch.randn(1, 1, args.dim, dtype=torch.bfloat16), torch.tensor([True]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The rewritten programs as eager modules, and the .pte + .ptd lowered from them."""
    return lowered_program(OPTIONS, WORKDIR_ENV, tmp_path_factory)


def run_method(runner: Path, exported, method: str, inputs, work: Path, preload: Path | None):
    """Run one method under the runner; returns the process and the output files' bytes."""
    _, pte, ptd = exported
    files = []
    for i, tensor in enumerate(inputs):
        files.append(work / f"input-{i}.bin")
        # Raw bytes, little-endian on x86; as uint8 because numpy has no bfloat16.
        files[-1].write_bytes(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    command = runner_command(
        runner, [f"--model_path={pte}", f"--data_path={ptd}", f"--method_name={method}",
                 f"--inputs={','.join(map(str, files))}", f"--output_file={work / 'output'}",
                 "--print_output=none"],
        preload=preload, prefix=shlex.split(os.environ.get(PREFIX_ENV, "")))
    result = subprocess.run(command, env=runner_env(), capture_output=True, text=True, timeout=600)
    outputs = sorted(work.glob("output-*.bin"), key=lambda p: int(p.stem.split("-")[1]))
    return result, [p.read_bytes() for p in outputs]


def _runner(way: str) -> tuple[Path, Path | None]:
    """The runner binary and the library to preload for it."""
    stock = Path(os.environ[RUNNER_ENV])
    if not stock.is_file():
        pytest.fail(f"${RUNNER_ENV} names {stock}, which is not a file")
    if way == "linked":
        return stock.with_name(LINKED_RUNNER), None
    library = et_int4.runtime.library_path()
    if library is None:
        pytest.fail("libet_int4.so is not built: pip install --no-build-isolation -e .")
    return stock, library


@pytest.mark.parametrize("method", ["prefill", "target_verify", "draft_decode"])
@pytest.mark.parametrize("way", ["preloaded", "linked"])
def test_runner_matches_the_rewritten_program(exported, method, way, tmp_path):
    runner, preload = _runner(way)
    if not runner.is_file():
        pytest.skip(f"{runner} is not built (tools/build_executor_runner.sh builds it)")
    inputs = _inputs(method)
    result, outputs = run_method(runner, exported, method, inputs, tmp_path, preload)
    assert result.returncode == 0, result.stdout + result.stderr

    program = exported[0][method]
    for name, buf in program.named_buffers():
        if name.endswith(("k_cache", "v_cache")):
            buf.zero_()  # each runner process starts from the exported (zero) caches too
    with torch.no_grad():
        expected = program(*inputs)
    assert len(outputs) == len(expected)
    for data, ref in zip(outputs, expected):
        assert len(data) == ref.numel() * ref.element_size()
    actual = [torch.frombuffer(bytearray(data), dtype=ref.dtype).view(ref.shape)
              for data, ref in zip(outputs, expected)]
    tolerance = TOLERANCES[method]
    (greedy, *floats), (ref_greedy, *ref_floats) = actual, expected
    for out, ref in zip(floats, ref_floats):
        assert torch.isfinite(out.float()).all()
        assert rel_error(out, ref) < tolerance.rel_error
    assert torch.equal(greedy, floats[-1].argmax(-1))  # the program's own argmax of its logits
    assert (greedy == ref_greedy).float().mean() >= tolerance.argmax


def test_runner_without_the_library_names_the_missing_symbol(exported, tmp_path):
    runner, _ = _runner("preloaded")
    result, outputs = run_method(runner, exported, "target_verify", _inputs("target_verify"),
                                 tmp_path, preload=None)
    assert result.returncode != 0
    assert MISSING_SYMBOL in result.stdout + result.stderr
    assert outputs == [], "the runner wrote outputs although the op was missing"
