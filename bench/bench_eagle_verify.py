"""Latency of one EAGLE verify forward (chain_len + 1 tokens) against one decode-sized forward.

The target has Llama 3 8B's layer shapes (dim 4096, ffn 14336, GQA 32/8, vocab 128256) and a few
layers, int4 weights with group size 32. Each forward is the exported, rewritten program run on the
GPU inside a CUDA graph (median of replays), with the int4 linears either routed to
et_int4_plain_mm or left as torchao's dequantize + bf16 linear:

    python bench/bench_eagle_verify.py [--layers 4] [--chain-len 7]

With --pte DIR it writes the two routed programs instead, as methods `decode` and `verify` of one
ExecuTorch CUDA program, to time them under executor_runner (bench/runner_latency.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from pathlib import Path

import et_int4
import torch
from bench_int4_mm import median_us
from et_int4.export.export_eagle import lower_to_executorch
from et_int4.export.models import CONFIGS, MethodModule, build_model, quantize_int4, with_layers
from torch.export.passes import move_to_device_pass

PTE_NAME = "verify_decode.pte"


def forward_us(program: torch.export.ExportedProgram, tokens: int, vocab: int) -> float:
    module = move_to_device_pass(program, "cuda:0").module()
    ids = torch.randint(0, vocab, (1, tokens), device="cuda")
    pos = torch.arange(tokens, device="cuda")
    with torch.no_grad():
        module(ids, pos)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(ids, pos)
    graph.replay()
    return median_us(graph.replay, replays=50)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chain-len", type=int, default=7)
    parser.add_argument("--pte", type=Path, metavar="DIR",
                        help="instead of timing, lower the routed programs as methods decode and "
                             "verify of DIR/verify_decode.pte, for bench/runner_latency.py")
    args = parser.parse_args(argv)
    verify = args.chain_len + 1
    config = dataclasses.replace(with_layers(CONFIGS["llama3-8b"], args.layers), max_seq_len=256)
    model = quantize_int4(build_model(config), group_size=32)
    print(f"{torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}; "
          f"target: {args.layers} layers of Llama 3 8B shapes + lm_head, int4 gs 32", flush=True)
    rows, routed_programs = [], {}
    for method, tokens in (("decode", 1), ("verify", verify)):
        with torch.no_grad():
            exported = torch.export.export(MethodModule(model, "target_verify"),
                                           (torch.zeros(1, tokens, dtype=torch.long), torch.arange(tokens)))
        routed = routed_programs[method] = et_int4.rewrite_int4_linears(exported, matvec_max_m=verify)
        if args.pte is None:
            rows.append((tokens, forward_us(routed, tokens, config.vocab_size),
                         forward_us(exported, tokens, config.vocab_size)))
    if args.pte is not None:
        files = lower_to_executorch(routed_programs, {}, args.pte, pte_name=PTE_NAME)
        print("Wrote " + ", ".join(str(f) for f in files))
        return 0
    print("| tokens | et_int4 us | dequant + linear us |\n| --- | --- | --- |")
    for tokens, ours, dequant in rows:
        print(f"| {tokens} | {ours:.1f} | {dequant:.1f} |")
    print(f"verify ({verify} tokens) / decode (1 token): et_int4 {rows[1][1] / rows[0][1]:.2f}, "
          f"dequant + linear {rows[1][2] / rows[0][2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
