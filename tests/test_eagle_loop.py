"""The EAGLE loop of eagle_runner (runtime/eagle/eagle_loop.cpp) on CPU, over the fake model of
tests/eagle_loop_fake.cpp, whose next token depends on every KV entry a row attends to: speculative
decoding must give greedy decoding's tokens for any draft, and forced drafts their exact acceptance.
Also the runner's command line and report (runtime/eagle_runner.py)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from et_int4.runtime.eagle_runner import EagleRun, ReportError, parse_reports
from et_int4.runtime.runner import runner_env
from runner_programs import requires_runner

REPO = Path(__file__).resolve().parents[1]
COMPILER = shutil.which("c++") or shutil.which("g++")
RUNNER_ENV = "ET_INT4_EAGLE_RUNNER"


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    if COMPILER is None:
        pytest.skip("no C++ compiler (c++ or g++) on PATH to build tests/eagle_loop_fake.cpp")
    binary = tmp_path_factory.mktemp("eagle") / "eagle_loop_fake"
    subprocess.run([COMPILER, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{REPO}",
                    str(REPO / "tests/eagle_loop_fake.cpp"), str(REPO / "runtime/eagle/eagle_loop.cpp"),
                    "-o", str(binary)], check=True)
    return binary


def run(fake: Path, **args):
    """The fake's report, parsed."""
    for key in ("prompt", "forced_accept", "reference"):
        if key in args:
            args[key] = " ".join(map(str, args[key]))
    result = subprocess.run([str(fake), *(f"{k}={v}" for k, v in args.items())], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [report] = parse_reports(result.stdout)
    return report


def failure(fake: Path, **args) -> str:
    args = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in args.items()}
    result = subprocess.run([str(fake), *(f"{k}={v}" for k, v in args.items())], capture_output=True, text=True)
    assert result.returncode != 0, result.stdout
    return result.stderr


def random_prompt(rng: random.Random, vocab: int = 50) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]


@pytest.mark.parametrize("chain_len", [1, 3, 7])
@pytest.mark.parametrize("accuracy", [0.0, 0.6, 0.9, 1.0])
def test_speculative_tokens_are_greedy_tokens(fake, chain_len, accuracy):
    rng = random.Random(chain_len * 100 + int(accuracy * 10))
    for seed in range(4):
        common = dict(chain_len=chain_len, min_prefill_len=chain_len + 2, seed=seed, prompt=random_prompt(rng),
                      max_new_tokens=rng.randint(1, 90))
        greedy = run(fake, mode="greedy", **common)
        spec = run(fake, accuracy=accuracy, **common)
        assert spec.tokens == greedy.tokens
        assert len(spec.tokens) == common["max_new_tokens"] and spec.stop == "max_new_tokens"
        assert sum(spec.histogram.values()) == spec.verify.calls
        assert spec.draft.calls == chain_len * spec.verify.calls
        if accuracy == 1.0:
            assert spec.histogram[chain_len] == spec.verify.calls


def test_greedy_over_one_token_forwards_equals_greedy_over_verify_windows(fake):
    prompt = random_prompt(random.Random(3))
    wide = run(fake, mode="greedy", prompt=prompt)
    narrow = run(fake, mode="greedy", prompt=prompt, decode_window=1)
    assert narrow.tokens == wide.tokens
    assert narrow.decode.calls == wide.decode.calls == len(wide.tokens) - 1


@pytest.mark.parametrize("pattern", [[0], [7], [0, 7, 3, 1, 5, 2, 6, 4], [2, 0, 0, 7]])
def test_forced_drafts_are_accepted_exactly_as_forced(fake, pattern):
    prompt = random_prompt(random.Random(len(pattern)))
    # The reference reaches past the last verify's drafts, so that every proposal is forced.
    reference = run(fake, mode="greedy", prompt=prompt, max_new_tokens=100 + 8).tokens
    spec = run(fake, prompt=prompt, max_new_tokens=100, forced_accept=pattern, reference=reference)
    assert spec.tokens == reference[:100]
    produced, accepted = 1, []  # the first token comes from prefill
    while produced < 100:
        accepted.append(pattern[len(accepted) % len(pattern)])
        produced += accepted[-1] + 1
    assert spec.histogram == {a: accepted.count(a) for a in range(8)}
    if pattern == [0]:
        assert spec.mean_accepted == 0


def test_prompts_shorter_than_min_prefill_len_and_at_every_length(fake):
    for length in range(1, 14):
        prompt = list(range(3, 3 + length))
        assert run(fake, prompt=prompt, min_prefill_len=12).tokens == run(
            fake, mode="greedy", prompt=prompt, min_prefill_len=12).tokens


def test_end_token_stops_both_modes_at_its_first_occurrence(fake):
    greedy = run(fake, mode="greedy", prompt=[4, 5], max_new_tokens=80).tokens
    eos = greedy[30]
    first = greedy.index(eos)
    for mode in ("greedy", "speculative"):
        report = run(fake, mode=mode, prompt=[4, 5], max_new_tokens=80, eos_id=eos)
        assert report.tokens == greedy[:first + 1]
        assert report.stop == "end_token"


def test_a_full_kv_cache_stops_without_overrunning_it(fake):
    # The fake throws on a forward past max_seq_len; both modes stop before that.
    greedy = run(fake, mode="greedy", prompt=[1, 2, 3], max_seq_len=40, max_new_tokens=500)
    spec = run(fake, prompt=[1, 2, 3], max_seq_len=40, max_new_tokens=500, accuracy=0.8)
    assert greedy.stop == spec.stop == "kv_cache_full"
    # The prefill token, then one per decode window at n = 3 .. 40 - 8.
    assert len(greedy.tokens) == 1 + (40 - 8 - 3 + 1)
    shorter = min(len(greedy.tokens), len(spec.tokens))
    assert spec.tokens[:shorter] == greedy.tokens[:shorter]


@pytest.mark.parametrize("args, message", [
    (dict(prompt=[50]), "outside the vocabulary [0, 50)"),
    (dict(prompt=[]), "the prompt is empty"),
    (dict(prompt=[1], forced_accept=[8], reference=[1]), "forced_accept 8 must lie in 0..chain_len (7)"),
    (dict(prompt=[1], forced_accept=[1]), "forced_accept needs reference_file"),
    (dict(prompt=[1], max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(prompt=[1, 2, 3], max_seq_len=2, min_prefill_len=1, chain_len=1), "more than the program's max_seq_len 2"),
    (dict(prompt=[1], chain_len=0), "a chain needs at least 1 draft"),
    (dict(prompt="1 x"), "'x' is not a token id"),
])
def test_bad_input_is_refused_with_what_was_expected(fake, args, message):
    assert message in failure(fake, **args)


def write_lines(path: Path, lines: list[list[int]]) -> Path:
    path.write_text("".join(" ".join(map(str, line)) + "\n" for line in lines))
    return path


def test_prompts_and_references_from_files_repeat_every_prompt(fake, tmp_path):
    prompts = [[4, 5], [9, 1, 7], [3]]
    greedy = [run(fake, mode="greedy", prompt=p, max_new_tokens=30).tokens for p in prompts]
    args = dict(prompts_file=write_lines(tmp_path / "p.txt", prompts), max_new_tokens=22, forced_accept="2,5")
    result = subprocess.run([str(fake), *(f"{k}={v}" for k, v in args.items()), "repeat=2",
                             f"reference_file={write_lines(tmp_path / 'r.txt', greedy)}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    reports = parse_reports(result.stdout)
    assert [(r.run, r.prompt) for r in reports] == [(r, p) for r in range(2) for p in range(3)]
    for report in reports:
        assert report.tokens == greedy[report.prompt][:22]
        assert {a for a, n in report.histogram.items() if n} == {2, 5}


def test_a_reference_file_needs_one_line_per_prompt_with_or_without_forced_drafts(fake, tmp_path):
    prompts = write_lines(tmp_path / "p.txt", [[4, 5], [9, 1, 7]])
    reference = write_lines(tmp_path / "r.txt", [list(range(40))])
    for forced in ([], [1]):
        message = failure(fake, prompts_file=prompts, reference_file=reference, forced_accept=forced)
        assert "reference_file has 1 line(s) for 2 prompt(s): give one reference line per prompt" in message


def test_a_reference_shorter_than_the_forced_drafts_read_is_refused_before_any_work(fake, tmp_path):
    prompts = [[4, 5], [9, 1, 7]]
    greedy = [run(fake, mode="greedy", prompt=p, max_new_tokens=30).tokens for p in prompts]
    # 20 new tokens, drafts forced to accept up to 3 of chain_len 7: the last speculation starts
    # at most 18 tokens after the first and reads 3 + 1 reference tokens beyond it.
    needed = 18 + 4 + 1
    args = dict(prompts_file=write_lines(tmp_path / "p.txt", prompts), max_new_tokens=20, forced_accept=[3, 0])
    assert run(fake, prompt=prompts[1], reference=greedy[1][:needed], max_new_tokens=20,
               forced_accept=[3, 0]).tokens == greedy[1][:20]
    short = write_lines(tmp_path / "r.txt", [greedy[0], greedy[1][:needed - 1]])
    message = failure(fake, reference_file=short, abort_after_calls=1, **args)
    assert (f"prompt 1: the reference has {needed - 1} tokens, but the forced drafts of 20 new tokens read up "
            f"to {needed}") in message
    # Without forced drafts nothing reads the references: any length will do.
    assert run(fake, prompt=prompts[1], reference=[1], max_new_tokens=20).tokens == greedy[1][:20]


def test_a_reference_need_not_reach_past_a_full_kv_cache(fake):
    prompt = [1, 2, 3]
    greedy = run(fake, mode="greedy", prompt=prompt, max_seq_len=40, max_new_tokens=500, decode_window=1).tokens
    # Speculations start while n + chain_len + 1 <= 40, n = 3 + generated: generated <= 29,
    # and read up to chain_len tokens beyond it.
    assert len(greedy) > 37
    spec = run(fake, prompt=prompt, max_seq_len=40, max_new_tokens=500, forced_accept=[7], reference=greedy[:37])
    assert spec.stop == "kv_cache_full" and spec.tokens == greedy[:len(spec.tokens)]
    assert "read up to 37" in failure(fake, prompt=prompt, max_seq_len=40, max_new_tokens=500, forced_accept=[7],
                                      reference=greedy[:36])


@pytest.mark.parametrize("repeat", [0, -1])
def test_repeat_below_one_is_refused(fake, repeat):
    assert f"repeat must be at least 1, got {repeat}" in failure(fake, repeat=repeat, abort_after_calls=1)


def test_a_prompts_file_without_prompts_is_refused(fake, tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("\n  \n")
    assert "no prompt given" in failure(fake, prompts_file=empty)


def test_reports_printed_before_a_crash_reach_the_pipe(fake, tmp_path):
    """Each report is flushed: a runtime that crashes on a later prompt keeps the earlier ones."""
    prompts = write_lines(tmp_path / "p.txt", [[4, 5], [9, 1, 7]])
    # Greedy: 1 prefill + 4 decode calls per prompt of 5 new tokens; abort in the second prompt.
    result = subprocess.run([str(fake), f"prompts_file={prompts}", "mode=greedy", "max_new_tokens=5",
                             "abort_after_calls=7"], capture_output=True, text=True)
    assert result.returncode < 0  # killed by SIGABRT
    [report] = parse_reports(result.stdout)
    assert report.prompt == 0 and len(report.tokens) == 5


def test_run_flags():
    flags = EagleRun(Path("m.pte"), Path("w.ptd"), prompt=[1, 2], forced_accept=[0, 3],
                     reference_file=Path("ref.txt"), cuda_graph_methods=["target_verify", "draft_decode"]).flags()
    assert "--model_path=m.pte" in flags and "--data_path=w.ptd" in flags
    assert "--prompt=1 2" in flags and "--forced_accept=0,3" in flags and "--reference_file=ref.txt" in flags
    assert "--cuda_graph_methods=target_verify,draft_decode" in flags
    assert not any(f.startswith("--prompts_file") for f in flags)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of prompt and prompts_file"),
    (dict(prompt=[1], prompts_file=Path("p")), "exactly one of prompt and prompts_file"),
    (dict(prompt=[1], mode="beam"), "expected 'speculative' or 'greedy'"),
    (dict(prompt=[1], forced_accept=[0]), "forced_accept needs reference_file"),
    (dict(prompt=[1], repeat=0), "repeat 0 must be at least 1"),
])
def test_run_flags_refuse_bad_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EagleRun(Path("m.pte"), **kwargs).flags()


def test_reports_parse_with_log_lines_between_and_refuse_a_truncated_one():
    output = ("eagle_runner: speculative, chain_len 2\n== prompt 0 run 0: 2 tokens\ntokens: 5 6 7\n"
              "I 00:00:01.000 executorch:cuda_backend.cpp:1 stop: not a field\nstop: max_new_tokens\n"
              "decode_rate: 2 tokens in 0.001000 s, 2000.0 tokens/s\nprefill: 3 tokens, 1 calls, median 1.0000 ms, "
              "mean 1.0000 ms\nverify: 1 calls, median 0.5000 ms, mean 0.5000 ms\n"
              "draft: 2 calls, median 0.1000 ms, mean 0.1000 ms\naccepted: mean 1.000 of 2 drafts per verify\n"
              "histogram: 0:0 1:1 2:0\n== prompt 1 run 0: 1 tokens\ntokens: 9\nstop: end_token\n"
              "decode_rate: 0 tokens in 0.000001 s, 0.0 tokens/s\nprefill: 3 tokens, 1 calls, median 1.0000 ms, "
              "mean 1.0000 ms\n")
    first, second = parse_reports(output)
    assert first.tokens == [5, 6, 7] and first.stop == "max_new_tokens" and first.tokens_per_s == 2000.0
    assert first.verify.median_ms == 0.5 and first.draft.calls == 2
    assert first.mean_accepted == 1.0 and first.histogram == {0: 0, 1: 1, 2: 0}
    assert second.prompt == 1 and second.stop == "end_token" and second.verify is None
    with pytest.raises(ReportError, match="no 'stop:' line"):
        parse_reports("== prompt 0 run 0: 1 tokens\ntokens: 1\n")
    with pytest.raises(ReportError, match="no '== prompt' report"):
        parse_reports("error: something\n")


@requires_runner(RUNNER_ENV, "eagle_runner", "eagle_runner")
def test_the_built_runner_drives_a_program_without_the_cuda_backend(tmp_path):
    """eagle_runner's ExecuTorch side (Module, constant methods, shapes, dtypes, the methods each
    mode loads, the report) on CPU: the tiny EAGLE program with target_decode lowered to ExecuTorch's
    portable ops, without int4 weights. Such a program keeps a KV cache per method, so this checks
    the plumbing, not the numbers: speculative and greedy decoding still agree, and forced drafts
    are accepted as forced."""
    import torch
    from et_int4.export.export_eagle import DECODE_METHOD, ExportOptions, constant_methods, example_inputs
    from et_int4.export.models import MethodModule, build_model
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    options = ExportOptions(config="tiny", chain_len=3, matvec_max_m=4, max_seq_len=64, target_decode=True)
    model = build_model(options.model_args)

    class LogitsFirst(torch.nn.Module):  # a method as exported before the greedy tokens were output 0
        def __init__(self, name):
            super().__init__()
            self.method = MethodModule(model, name, logits=True)

        def forward(self, *args):
            _, features, logits = self.method(*args)
            return logits, features

    def lowered(make_module, methods, name):
        with torch.no_grad():
            programs = {method: torch.export.export(make_module(method), inputs, dynamic_shapes=dynamic)
                        for method, (inputs, dynamic) in example_inputs(options).items() if method in methods}
        program = to_edge_transform_and_lower(programs, compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                              constant_methods=constant_methods(options)).to_executorch(
            ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
        (tmp_path / name).write_bytes(program.buffer)
        return tmp_path / name

    pte = lowered(lambda method: MethodModule(model, method), options.methods, "eagle_portable.pte")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5 6 7\n1 2 3 4 5 6 7 8 9 10 11\n")

    def runner(program=pte, **kwargs):
        flags = EagleRun(program, prompts_file=prompts, **kwargs).flags()
        return subprocess.run([os.environ[RUNNER_ENV], *flags], env=runner_env(), capture_output=True, text=True,
                              timeout=600)

    def reports(max_new_tokens, loads, **kwargs):
        result = runner(max_new_tokens=max_new_tokens, **kwargs)
        assert result.returncode == 0, result.stderr[-4000:]
        header = next(line for line in result.stdout.splitlines() if line.startswith("eagle_runner: "))
        assert header.endswith(", loaded " + " ".join(loads)), header
        return parse_reports(result.stdout)

    greedy = reports(24, ["prefill", "target_verify"], mode="greedy")
    reference = tmp_path / "reference.txt"
    reference.write_text("".join(" ".join(map(str, r.tokens)) + "\n" for r in greedy))
    assert [len(r.tokens) for r in greedy] == [24, 24]
    assert [len(r.tokens) for r in reports(24, ["prefill", DECODE_METHOD], mode="greedy",
                                           decode_method=DECODE_METHOD)] == [24, 24]
    speculative = ["prefill", "target_verify", "draft_decode"]
    for report in reports(20, speculative, decode_method="no_such_method"):  # speculation decodes nothing
        assert report.tokens == greedy[report.prompt].tokens[:20]
        assert report.draft.calls == options.chain_len * report.verify.calls
    for report in reports(20, speculative, forced_accept=[0, 3, 1, 2], reference_file=reference):
        assert report.tokens == greedy[report.prompt].tokens[:20]
        assert report.histogram == {0: 2, 1: 2, 2: 2, 3: 2}  # 1 + 1 + 4 + 2 + 3 + 1 + 4 + 2 + 3 >= 20

    missing = runner(mode="greedy", decode_method="no_such_method")
    assert missing.returncode == 2 and "has no method no_such_method" in missing.stderr
    short = tmp_path / "short.txt"
    short.write_text(reference.read_text().splitlines()[0] + "\n")
    refused = runner(max_new_tokens=20, forced_accept=[1], reference_file=short)
    assert refused.returncode == 2
    assert "reference_file has 1 line(s) for 2 prompt(s)" in refused.stderr
    assert "== prompt" not in refused.stdout
    old = runner(lowered(LogitsFirst, ("prefill", "target_verify"), "logits_first.pte"), mode="greedy")
    assert old.returncode == 1 and "== prompt" not in old.stdout
    assert "prefill returns BFloat16 first, not the int64 greedy tokens" in old.stderr
    assert "re-export it" in old.stderr
    nan_model = build_model(options.model_args)
    nan_model.target.norm.weight.data[0] = float("nan")
    nan = runner(lowered(lambda method: MethodModule(nan_model, method), ("prefill", "target_verify"), "nan.pte"),
                 mode="greedy")
    assert nan.returncode == 1 and "== prompt" not in nan.stdout
    assert "prefill: the logits of row 0 hold NaN" in nan.stderr
