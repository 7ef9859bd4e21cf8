"""EAGLE-3 speculative decoding under eagle_runner (ExecuTorch's runtime) for Llama 3 8B layer shapes:
time per verify, per draft step and per plain decode step, and the speedup over plain decoding as a
function of the mean accepted length.

    python bench/bench_eagle_runner.py export --layers 4 --dir out/eagle-llama     # needs a GPU
    python bench/bench_eagle_runner.py time --runner .runner/eagle_runner --dir out/eagle-llama

`export` writes the EAGLE program of export/export_eagle.py with Llama 3 8B shapes (random weights,
--layers target layers, int4 gs 32) with its `target_decode` method (ExportOptions.target_decode:
the target over one token, M = 1, plain decoding). `time` runs eagle_runner on one random prompt:
greedy over target_decode (plain decoding), greedy over target_verify (the reference tokens), then
speculative decoding with the program's draft and with drafts forced to accept a = 0..chain_len
tokens per verify (the weights are random, so the real draft is almost never right); without and
with CUDA graphs. Speedup = tokens/s of speculative decoding over tokens/s of plain decoding,
measured, and modeled from the per-call medians: (a + 1) * decode / (chain_len * draft + verify).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import sys
from pathlib import Path

from et_int4.export.export_eagle import DECODE_METHOD, ExportOptions
from et_int4.runtime.eagle_runner import EagleRun, Report, parse_reports
from et_int4.runtime.runner import runner_env

CONFIG_FILE = "bench_config.json"
GRAPH_METHODS = ("target_verify", "draft_decode", DECODE_METHOD)
PROMPT_LEN = 16
NEW_TOKENS = 128


def export_options(args) -> ExportOptions:
    return ExportOptions(config="llama3-8b", chain_len=args.chain_len, matvec_max_m=args.chain_len + 1,
                         max_seq_len=args.max_seq_len, n_layers=args.layers, target_decode=True)


def export(args, opts: ExportOptions) -> int:
    import torch
    from et_int4.export.export_eagle import constant_methods, export_eagle, lower_to_executorch

    files = lower_to_executorch(export_eagle(opts).programs, constant_methods(opts), args.dir)
    (args.dir / CONFIG_FILE).write_text(json.dumps(
        {"layers": args.layers, "chain_len": args.chain_len, "max_seq_len": args.max_seq_len,
         "device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    print("Wrote " + ", ".join(str(f) for f in files))
    return 0


def run(args, label: str, **kwargs) -> Report:
    """One eagle_runner process; the report of its last (warm) run."""
    command = [str(args.runner), *EagleRun(args.dir / "eagle.pte", args.dir / "aoti_cuda_blob.ptd",
                                            prompts_file=args.dir / "prompt.txt", repeat=2, **kwargs).flags()]
    result = subprocess.run(command, env=runner_env(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        sys.exit(f"{label}: {' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return parse_reports(result.stdout)[-1]


def time_all(args) -> int:
    config = json.loads((args.dir / CONFIG_FILE).read_text())
    chain_len = config["chain_len"]
    rng = random.Random(0)
    (args.dir / "prompt.txt").write_text(" ".join(str(rng.randrange(1000)) for _ in range(PROMPT_LEN)) + "\n")
    lines = [f"{config['device']}, {datetime.date.today()}, eagle_runner (ExecuTorch 1.4.1): target {config['layers']} "
             f"layers of Llama 3 8B shapes + lm_head, draft 1 layer + lm_head, int4 gs 32, chain_len {chain_len}, "
             f"prompt {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, medians of the second (warm) run.", ""]
    for graphs in ((), GRAPH_METHODS):
        title = "CUDA graphs (" + ", ".join(graphs) + ")" if graphs else "no CUDA graphs"
        common = dict(cuda_graph_methods=graphs)
        plain = run(args, "plain decoding", mode="greedy", decode_method=DECODE_METHOD,
                    max_new_tokens=NEW_TOKENS, **common)
        reference = run(args, "reference", mode="greedy", max_new_tokens=NEW_TOKENS + chain_len + 1, **common)
        (args.dir / "reference.txt").write_text(" ".join(map(str, reference.tokens)) + "\n")
        model_draft = run(args, "the program's draft", max_new_tokens=NEW_TOKENS, **common)
        forced = {a: run(args, f"forced {a}", max_new_tokens=NEW_TOKENS, forced_accept=[a],
                         reference_file=args.dir / "reference.txt", **common) for a in range(chain_len + 1)}
        for name, report in [("the program's draft", model_draft), *((f"forced {a}", r) for a, r in forced.items())]:
            if report.tokens != reference.tokens[:NEW_TOKENS]:
                sys.exit(f"{title}, {name}: speculative tokens differ from greedy decoding (not lossless)")
        decode_ms = plain.decode.median_ms
        lines += [f"### {title}", "",
                  f"Per call (median ms): plain decode step ({DECODE_METHOD}, 1 token) {decode_ms:.3f}, "
                  f"verify (target_verify, {chain_len + 1} tokens) {forced[0].verify.median_ms:.3f}, "
                  f"draft step (draft_decode) {forced[0].draft.median_ms:.3f}, prefill ({PROMPT_LEN} tokens) "
                  f"{plain.prefill.median_ms:.3f}. Plain decoding: {plain.tokens_per_s:.1f} tokens/s. "
                  f"The program's own draft (random weights): mean accepted {model_draft.mean_accepted:.2f}, "
                  f"{model_draft.tokens_per_s:.1f} tokens/s.", "",
                  "| accepted per verify | tokens per verify | verify ms | draft ms | tokens/s | speedup measured | "
                  "speedup modeled |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for a, report in forced.items():
            modeled = (a + 1) * decode_ms / (chain_len * report.draft.median_ms + report.verify.median_ms)
            lines.append(f"| {report.mean_accepted:.2f} | {a + 1} | {report.verify.median_ms:.3f} | "
                         f"{report.draft.median_ms:.3f} | {report.tokens_per_s:.1f} | "
                         f"{report.tokens_per_s / plain.tokens_per_s:.2f} | {modeled:.2f} |")
        lines.append("")
        print("\n".join(lines), flush=True)
        lines = []
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    ex = steps.add_parser("export", help="write the program (needs a CUDA GPU)")
    ex.add_argument("--layers", type=int, default=4, help="target layers (default 4; Llama 3 8B has 32)")
    ex.add_argument("--chain-len", type=int, default=7)
    ex.add_argument("--max-seq-len", type=int, default=256)
    ex.add_argument("--dir", type=Path, required=True)
    tm = steps.add_parser("time", help="run eagle_runner over the program and print the tables")
    tm.add_argument("--runner", type=Path, required=True, help=".runner/eagle_runner")
    tm.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.step == "time":
        return time_all(args)
    try:
        opts = export_options(args)
    except ValueError as error:  # the model's own checks: --layers is the only flag that can fail them
        parser.error(f"--layers {args.layers}: {error}")
    return export(args, opts)


if __name__ == "__main__":
    raise SystemExit(main())
