"""eagle_runner (runtime/eagle/) on the GPU: greedy EAGLE-3 speculative decoding of the tiny EAGLE
program on ExecuTorch's runtime gives exactly the tokens of greedy decoding by the target alone
(target_verify advanced one position at a time), for the program's own draft, a draft that is
always wrong, and drafts forced to every acceptance length; with and without CUDA graphs. Plain
decoding over target_decode (one token per forward) gives the same tokens too.

``$ET_INT4_EAGLE_RUNNER`` names the runner (tools/build_executor_runner.sh builds it into
.runner/); ``$ET_INT4_EAGLE_WORKDIR`` keeps the exported program there for later runs.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from et_int4.export.export_eagle import DECODE_METHOD, ExportOptions
from et_int4.runtime.eagle_runner import EagleRun, parse_reports
from et_int4.runtime.runner import runner_env
from runner_programs import lowered_program, requires_runner

RUNNER_ENV = "ET_INT4_EAGLE_RUNNER"
WORKDIR_ENV = "ET_INT4_EAGLE_WORKDIR"

pytestmark = [pytest.mark.cuda, requires_runner(RUNNER_ENV, "eagle_runner", "eagle_runner")]

OPTIONS = ExportOptions(config="tiny", chain_len=7, matvec_max_m=8, max_seq_len=128, target_decode=True)
NEW_TOKENS = 72
# Every forced proposal lies inside the reference: a verify drafts up to chain_len tokens ahead.
REFERENCE_TOKENS = NEW_TOKENS + OPTIONS.chain_len + 1
# Measured by issue 9's end-to-end test: target_verify's argmax agrees with the CPU reference on
# at least this fraction of positions.
ARGMAX_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return lowered_program(OPTIONS, WORKDIR_ENV, tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[list[list[int]], Path]:
    """Prompts shorter than, equal to and longer than min_prefill_len, and the file listing them."""
    rng = random.Random(12)
    vocab = OPTIONS.model_args.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 5, OPTIONS.min_prefill_len, 23)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    return prompts, path


def run_runner(program, tmp_path: Path, expect_ok: bool = True, **kwargs):
    _, pte, ptd = program
    runner = Path(os.environ[RUNNER_ENV])
    if not runner.is_file():
        pytest.fail(f"${RUNNER_ENV} names {runner}, which is not a file")
    command = [str(runner), *EagleRun(pte, ptd, **kwargs).flags()]
    result = subprocess.run(command, env=runner_env(), capture_output=True, text=True, timeout=600)
    (tmp_path / "runner.log").write_text(result.stdout + result.stderr)
    if not expect_ok:
        return result
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return parse_reports(result.stdout)


@pytest.fixture(scope="module")
def greedy(program, prompts, tmp_path_factory):
    """Greedy decoding by the target alone, REFERENCE_TOKENS per prompt, and the file listing them."""
    work = tmp_path_factory.mktemp("greedy")
    reports = run_runner(program, work, prompts_file=prompts[1], mode="greedy", max_new_tokens=REFERENCE_TOKENS)
    assert [r.stop for r in reports] == ["max_new_tokens"] * len(prompts[0])
    tokens = [r.tokens for r in reports]
    path = work / "reference.txt"
    path.write_text("".join(" ".join(map(str, t)) + "\n" for t in tokens))
    return tokens, path


def agreement_with_the_target(program, prompts, generated) -> tuple[int, int]:
    """Positions at which generated tokens are the target's argmax, and positions checked: the
    rewritten programs run eagerly on CPU over the same tokens (teacher forcing), the KV cache that
    prefill writes being the one target_verify reads."""
    prefill, verify = program[0]["prefill"], program[0]["target_verify"]
    window = OPTIONS.chain_len + 1
    agree = total = 0
    for prompt, tokens in zip(prompts, generated):
        for module in (prefill, verify):
            for name, buffer in module.named_buffers():
                if name.endswith(("k_cache", "v_cache")):
                    buffer.zero_()
        sequence = prompt + tokens
        padded = prompt + [prompt[-1]] * max(0, OPTIONS.min_prefill_len - len(prompt))
        with torch.no_grad():
            greedy, _ = prefill(torch.tensor([padded]), torch.arange(len(padded)))
            predicted = {len(prompt): int(greedy[0, len(prompt) - 1])}
            caches = dict(prefill.named_buffers())
            for name, buffer in verify.named_buffers():
                if name.endswith(("k_cache", "v_cache")):
                    buffer.copy_(caches[name])
            for start in range(len(prompt), len(sequence) - window, window):
                greedy, _ = verify(torch.tensor([sequence[start:start + window]]), torch.arange(start, start + window))
                predicted.update({start + 1 + i: int(t) for i, t in enumerate(greedy[0])})
        for position, token in predicted.items():
            agree += token == sequence[position]
            total += 1
    return agree, total


def test_greedy_decoding_follows_the_target(program, prompts, greedy):
    """The runner's greedy tokens are the target's argmax."""
    agree, total = agreement_with_the_target(program, prompts[0], greedy[0])
    assert agree / total >= ARGMAX_AGREEMENT, f"{agree} of {total} positions agree"


def loaded_methods(tmp_path: Path) -> list[str]:
    """The methods the last run_runner loaded, from the runner's header line."""
    header = next(line for line in (tmp_path / "runner.log").read_text().splitlines()
                  if line.startswith("eagle_runner: "))
    return header.split(", loaded ")[1].split()


def test_plain_decoding_over_target_decode_follows_the_target(program, prompts, tmp_path):
    """Greedy decoding over target_decode (M = 1) picks the target's argmax, as greedy decoding over
    target_verify does. Not token for token the same sequence: the kernel computes a row the same
    way for every M (test_kernels_cuda), but the compiled programs around it do not (on an H100,
    2026-11-27, AOTInductor's M = 1 and M = 8 programs gave logits that differ by up to 0.018 at 30
    of 96 positions), so a near tie can go the other way, and a free-running sequence differs from
    that token on. Loading only prefill and target_decode also keeps ExecuTorch 1.4.1 from loading
    a method all of whose weights are cached (it crashed)."""
    reports = run_runner(program, tmp_path, prompts_file=prompts[1], mode="greedy", decode_method=DECODE_METHOD,
                         max_new_tokens=REFERENCE_TOKENS)
    assert loaded_methods(tmp_path) == ["prefill", DECODE_METHOD]
    assert [r.decode.calls for r in reports] == [REFERENCE_TOKENS - 1] * len(prompts[0])
    agree, total = agreement_with_the_target(program, prompts[0], [r.tokens for r in reports])
    assert agree / total >= ARGMAX_AGREEMENT, f"{agree} of {total} positions agree"


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["plain", "cuda_graphs"])
def test_speculative_decoding_is_lossless(program, prompts, greedy, tmp_path, cuda_graphs):
    graphs = ["target_verify", "draft_decode"] if cuda_graphs else []
    reports = run_runner(program, tmp_path, prompts_file=prompts[1], max_new_tokens=NEW_TOKENS,
                         cuda_graph_methods=graphs, repeat=2)
    assert loaded_methods(tmp_path) == ["prefill", "target_verify", "draft_decode"]
    assert len(reports) == 2 * len(prompts[0])
    for report in reports:
        assert len(report.tokens) == NEW_TOKENS and report.stop == "max_new_tokens"
        assert report.tokens == greedy[0][report.prompt][:NEW_TOKENS]
        assert report.draft.calls == OPTIONS.chain_len * report.verify.calls


def test_a_draft_that_is_always_wrong_is_lossless(program, prompts, greedy, tmp_path):
    reports = run_runner(program, tmp_path, prompts_file=prompts[1], max_new_tokens=NEW_TOKENS, forced_accept=[0],
                         reference_file=greedy[1])
    for report in reports:
        assert report.tokens == greedy[0][report.prompt][:NEW_TOKENS]
        assert report.histogram[0] == report.verify.calls == NEW_TOKENS - 1
        assert report.mean_accepted == 0


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["plain", "cuda_graphs"])
def test_drafts_accepted_at_every_length_are_lossless(program, prompts, greedy, tmp_path, cuda_graphs):
    pattern = [0, 7, 3, 1, 5, 2, 6, 4]
    graphs = ["target_verify", "draft_decode"] if cuda_graphs else []
    reports = run_runner(program, tmp_path, prompts_file=prompts[1], max_new_tokens=NEW_TOKENS,
                         forced_accept=pattern, reference_file=greedy[1], cuda_graph_methods=graphs)
    for report in reports:
        assert report.tokens == greedy[0][report.prompt][:NEW_TOKENS]
        produced, accepted = 1, []
        while produced < NEW_TOKENS:
            accepted.append(pattern[len(accepted) % len(pattern)])
            produced += accepted[-1] + 1
        assert report.histogram == {a: accepted.count(a) for a in range(OPTIONS.chain_len + 1)}


def test_a_token_outside_the_vocabulary_is_refused(program, tmp_path):
    vocab = OPTIONS.model_args.vocab_size
    result = run_runner(program, tmp_path, expect_ok=False, prompt=[1, vocab])
    assert result.returncode == 2
    assert f"prompt token {vocab} is outside the vocabulary [0, {vocab})" in result.stderr
