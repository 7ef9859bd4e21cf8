"""Export a Llama-style target with an EAGLE-3 draft head to one ExecuTorch CUDA program.

Methods, sharing the target's weights and KV cache:
  prefill        tokens [1, T] (min_prefill_len <= T <= max_seq_len), input_pos [T]
                 -> next [1, T] int64, taps [1, T, 3 * dim]         linears left as dequant + linear,
                                                                    over target_verify's packed weights
  target_verify  tokens [1, chain_len + 1], input_pos [chain_len + 1]
                 -> next, taps (as prefill)                         linears -> et_int4_plain_mm
  draft_decode   tokens [1, 1], input_pos [1], target_hidden [1, 1, 3 * dim],
                 draft_hidden [1, 1, dim], from_target [1] bool
                 -> next [1, 1] int64, hidden [1, 1, dim]           linears -> et_int4_plain_mm
  target_decode  (with --target-decode) tokens [1, 1], input_pos [1]: plain decoding, the target
                 over one token -> next, taps                       linears -> et_int4_plain_mm
`next` is each row's greedy token (the argmax of its logits, on the GPU); with --logits every method
also returns its logits ([1, T, V]) as a third output. Constant methods: get_matvec_max_m,
get_shim_gemm_max_m, get_chain_len, get_max_seq_len, get_min_prefill_len and get_vocab_size.

    python -m et_int4.export.export_eagle --matvec-max-m 8 --output-dir out/

Without a CUDA GPU it stops after routing (with --dry-run, successfully).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.export import ExportedProgram

if __name__ == "__main__" and not __package__:
    # Run as a file (python export/export_eagle.py): run it as the installed et_int4.export module,
    # so that the relative imports below resolve (PEP 366).
    __package__ = "et_int4.export"
    importlib.import_module(__package__)

from ..backends.cuda.int4.limits import (
    DispatchLimitError,
    check_matvec_max_m,
    get_matvec_max_m,
    rebuild_hint,
    shim_gemm_max_m,
)
from ..backends.cuda.int4.packing import check_group_size
from ..passes.rewrite_int4 import explain_int4_linears, rewrite_int4_linears
from .models import CONFIGS, MethodModule, ModelArgs, build_model, quantize_int4, with_layers

METHODS = ("prefill", "target_verify", "draft_decode")  # every export has these
DECODE_METHOD = "target_decode"  # ExportOptions.target_decode adds it
PTE_NAME = "eagle.pte"


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    config: str = "tiny"
    chain_len: int = 7
    matvec_max_m: int = 8
    group_size: int = 32
    max_seq_len: int | None = None  # None: the config's
    seed: int = 0
    n_layers: int | None = None  # None: the config's
    rewrite: bool = True  # False: every int4 linear stays dequantize + linear (a baseline)
    target_decode: bool = False  # True: also DECODE_METHOD, the target over one token (plain decoding)
    logits: bool = False  # True: every method also returns its logits (third output)

    def __post_init__(self):
        self.model_args  # built now, so that a bad n_layers fails here, not minutes into an export

    @property
    def methods(self) -> tuple[str, ...]:
        return (*METHODS, DECODE_METHOD) if self.target_decode else METHODS

    @property
    def model_args(self) -> ModelArgs:
        args = CONFIGS[self.config]
        if self.n_layers is not None:
            args = with_layers(args, self.n_layers)
        if self.max_seq_len is not None:
            args = dataclasses.replace(args, max_seq_len=self.max_seq_len)
        return args

    @property
    def min_prefill_len(self) -> int:
        # Prefill's M must stay above the limit, or the pass would have to route part of its range.
        return max(self.matvec_max_m + 1, 2)


@dataclasses.dataclass(frozen=True)
class MethodSummary:
    name: str
    routed: tuple[str, ...]  # linears that call et_int4_plain_mm
    kept: tuple[str, ...]  # linears left as dequantize + linear


@dataclasses.dataclass
class EagleExport:
    model: torch.nn.Module  # the quantized eager model the programs were exported from
    exported: dict[str, ExportedProgram]  # as torch.export produced them
    programs: dict[str, ExportedProgram]  # after rewrite_int4_linears
    summary: list[MethodSummary]  # empty without rewrite


def _step(message: str):
    """Print a progress line; call the result to print how long the step took."""
    print(f"{message} ...", flush=True)
    start = time.perf_counter()
    return lambda: print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)


def example_inputs(opts: ExportOptions):
    """method -> (example args, dynamic shapes); the prefill example is the longest prompt so
    that AOTInductor sizes its buffers for the whole range."""
    args = opts.model_args

    def tokens_and_positions(n):
        return torch.zeros(1, n, dtype=torch.long), torch.arange(n)

    prefill_len = torch.export.Dim("prefill_len", min=opts.min_prefill_len, max=args.max_seq_len)
    hidden = torch.zeros(1, 1, args.dim, dtype=torch.bfloat16)
    inputs = {
        "prefill": (tokens_and_positions(args.max_seq_len),
                    (({1: prefill_len}, {0: prefill_len}),)),
        "target_verify": (tokens_and_positions(opts.chain_len + 1), None),
        "draft_decode": (
            (*tokens_and_positions(1), hidden.repeat(1, 1, 3), hidden, torch.tensor([True])), None),
        DECODE_METHOD: (tokens_and_positions(1), None),
    }
    return {name: inputs[name] for name in opts.methods}


def export_eagle(opts: ExportOptions) -> EagleExport:
    """Build and quantize the model, torch.export each method, route the small-M linears."""
    done = _step(f"Building the {opts.config} target + EAGLE-3 draft (seed {opts.seed}), "
                 f"int4 weights with group size {opts.group_size}")
    model = quantize_int4(build_model(opts.model_args, seed=opts.seed), opts.group_size)
    done()
    exported, programs = {}, {}
    with torch.no_grad():
        for name, (inputs, dynamic_shapes) in example_inputs(opts).items():
            done = _step(f"torch.export {name}")
            exported[name] = torch.export.export(
                MethodModule(model, name, logits=opts.logits), inputs, dynamic_shapes=dynamic_shapes)
            done()
    if not opts.rewrite:
        # No routing decisions to make: explaining them would only be thrown away (and could fail on
        # a dynamic M that straddles the limit, which concerns routing alone).
        print("Leaving every int4 linear as dequantize + linear (no rewrite)", flush=True)
        return EagleExport(model, exported, dict(exported), [])
    done = _step(f"Routing int4 linears with M <= {opts.matvec_max_m} to et_int4_plain_mm")
    summary = []
    for name, ep in exported.items():
        decisions = explain_int4_linears(ep, matvec_max_m=opts.matvec_max_m)
        summary.append(MethodSummary(
            name,
            routed=tuple(d.name for d in decisions if d.routed),
            kept=tuple(d.name for d in decisions if not d.routed),
        ))
        programs[name] = rewrite_int4_linears(ep, matvec_max_m=opts.matvec_max_m)
    done()
    return EagleExport(model, exported, programs, summary)


def constant_methods(opts: ExportOptions) -> dict:
    return {
        "get_matvec_max_m": opts.matvec_max_m,
        "get_shim_gemm_max_m": shim_gemm_max_m(),
        "get_chain_len": opts.chain_len,
        "get_max_seq_len": opts.model_args.max_seq_len,
        "get_min_prefill_len": opts.min_prefill_len,
        "get_vocab_size": opts.model_args.vocab_size,
    }


def lower_to_executorch(programs: dict[str, ExportedProgram], constants: dict, output_dir: Path,
                        pte_name: str = PTE_NAME) -> list[Path]:
    """Lower every program, as a method of one .pte, with ExecuTorch's CUDA backend; write the
    .pte and its .ptd files. ``constants`` become constant methods."""
    from executorch.backends.cuda.cuda_backend import CudaBackend
    from executorch.backends.cuda.cuda_partitioner import CudaPartitioner
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes import MemoryPlanningPass

    from ..backends.cuda.int4.cuda_backend import et_int4_in_cuda_backend

    done = _step(f"Lowering {', '.join(programs)} with the CUDA backend (AOTInductor)")
    with et_int4_in_cuda_backend():
        edge = to_edge_transform_and_lower(
            programs,
            # One partitioner per method: the backend names each method's compiled blobs by it.
            partitioner={
                name: [CudaPartitioner([CudaBackend.generate_method_name_compile_spec(name)])]
                for name in programs
            },
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
            constant_methods=constants,
        )
    done()
    done = _step("Serializing")
    program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
    ))
    files = write_program(program, output_dir, pte_name)
    done()
    return files


def write_program(program, output_dir: Path, pte_name: str = PTE_NAME) -> list[Path]:
    """Write an ExecutorchProgramManager's .pte (as ``pte_name``) and .ptd files into ``output_dir``.

    Each file is written under a temporary name (in a staging folder inside ``output_dir``, so on the
    same file system); only once all are written are they renamed into place, the .ptd files first
    and the .pte last. A failure while writing leaves an earlier export as it was. The renames are
    not atomic together: a failure between them (rare: a rename within one folder) can leave new
    .ptd files beside the old .pte, which the next successful export replaces. Returns the .pte first.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{pte_name}.", dir=output_dir) as staging:
        staged = Path(staging)
        with open(staged / pte_name, "wb") as f:
            program.write_to_file(f)
        # The CUDA backend keeps the weights in named data, one .ptd per tag: aoti_cuda_blob.ptd.
        program.write_tensor_data_to_file(staging)
        data = sorted(f.name for f in staged.iterdir() if f.name != pte_name)
        for name in [*data, pte_name]:  # the .pte last: a runner loads it first
            os.replace(staged / name, output_dir / name)
    return [output_dir / name for name in (pte_name, *data)]


def check_output_dir(parser: argparse.ArgumentParser, output_dir: Path) -> None:
    """Create ``output_dir`` and write a file in it now, not after minutes of lowering."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        parser.error(f"--output-dir {output_dir} cannot be written ({error.strerror or error}); "
                     f"choose a folder you can write to")


def print_summary(summary: list[MethodSummary]) -> None:
    if not summary:
        print("Linears per method: not routed (--no-rewrite), every int4 linear stays dequant + linear")
        return
    print("Linears per method:")
    width = max(len(s.name) for s in summary)
    for s in summary:
        print(f"  {s.name:<{width}}  {len(s.routed):3d} routed to et_int4_plain_mm, "
              f"{len(s.kept):3d} left as dequant + linear")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a Llama-style target with an EAGLE-3 draft head to one ExecuTorch "
                    "CUDA program (.pte + .ptd) whose verify and draft linears call "
                    "et_int4_plain_mm.")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny",
                        help="model shapes (weights are random); default: tiny")
    parser.add_argument("--chain-len", type=int, default=7,
                        help="draft tokens per speculation; target_verify takes chain_len + 1 "
                             "(default 7)")
    parser.add_argument("--matvec-max-m", type=int, default=None,
                        help="largest M routed to et_int4_plain_mm (default: get_matvec_max_m(), "
                             "raised to chain_len + 1 when smaller and SHIM_GEMM_MAX_M allows)")
    parser.add_argument("--group-size", type=int, default=32,
                        help="int4 quantization group size, a multiple of 32 (default 32)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="KV cache length and longest prefill (default: the config's)")
    parser.add_argument("--output-dir", type=Path, default=Path("out"),
                        help="where eagle.pte and its .ptd go (default: out/)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights (default 0)")
    parser.add_argument("--n-layers", type=int, default=None,
                        help="decoder layers of the target (default: the config's); fewer make a "
                             "quicker export of the same layer shapes")
    parser.add_argument("--no-rewrite", action="store_true",
                        help="leave every int4 linear as dequantize + linear: the baseline without "
                             "et_int4_plain_mm")
    parser.add_argument("--target-decode", action="store_true",
                        help=f"also export {DECODE_METHOD}: the target over one token (plain decoding, "
                             f"M = 1), sharing the target's weights and KV cache; eagle_runner "
                             f"--mode=greedy --decode_method={DECODE_METHOD} runs it")
    parser.add_argument("--logits", action="store_true",
                        help="every method also returns its logits [1, T, V] (third output), for "
                             "sampling on the host; eagle_runner reads only the greedy tokens")
    parser.add_argument("--dry-run", action="store_true",
                        help="stop after routing and the summary; needs no GPU")
    return parser


def parse_options(parser: argparse.ArgumentParser, argv=None):
    """Parse and check the arguments; every violation exits with status 2 and names the flag."""
    ns = parser.parse_args(argv)
    verify_len = ns.chain_len + 1
    shim_limit = shim_gemm_max_m()
    if ns.matvec_max_m is None:
        # Route the verify window when the library allows it; the checks below report when not.
        ns.matvec_max_m = max(get_matvec_max_m(), min(verify_len, shim_limit))
    limit = ns.matvec_max_m
    if ns.chain_len < 1:
        parser.error(f"--chain-len {ns.chain_len} must be at least 1")
    try:
        check_matvec_max_m(limit)
    except DispatchLimitError as error:
        parser.error(f"--matvec-max-m {limit}: {error}")
    if verify_len > limit:
        fix = (f", or raise --matvec-max-m to {verify_len}" if verify_len <= shim_limit else
               rebuild_hint(verify_len))
        parser.error(f"--chain-len {ns.chain_len} needs --matvec-max-m >= {verify_len} "
                     f"(target_verify runs chain_len + 1 tokens); use --chain-len <= {limit - 1}{fix}")
    args = CONFIGS[ns.config]
    for name, k in {"dim": args.dim, "ffn_dim": args.ffn_dim}.items():
        try:
            check_group_size(ns.group_size, k)
        except ValueError as error:
            parser.error(f"--group-size {ns.group_size}: {error} ({name} of --config {ns.config})")
    try:
        opts = ExportOptions(ns.config, ns.chain_len, limit, ns.group_size, ns.max_seq_len, ns.seed,
                             ns.n_layers, not ns.no_rewrite, ns.target_decode, ns.logits)
    except ValueError as error:  # the model's own checks: the layer count is the only flag that can fail them
        parser.error(f"--n-layers {ns.n_layers}: {error}")
    max_seq_len = opts.model_args.max_seq_len
    if max_seq_len <= opts.min_prefill_len:
        parser.error(f"--max-seq-len {max_seq_len} leaves no range for prefill, which starts at "
                     f"{opts.min_prefill_len} tokens (--matvec-max-m + 1); use --max-seq-len >= "
                     f"{opts.min_prefill_len + 1}")
    return opts, ns


def main(argv=None) -> int:
    parser = build_parser()
    opts, ns = parse_options(parser, argv)
    if not ns.dry_run:
        check_output_dir(parser, ns.output_dir)
    export = export_eagle(opts)
    print_summary(export.summary)
    if ns.dry_run:
        print("Dry run: nothing lowered or written.")
        return 0
    if not torch.cuda.is_available():
        print("error: lowering with the ExecuTorch CUDA backend needs a CUDA GPU, and "
              "torch.cuda.is_available() is False; rerun on a GPU machine, or pass --dry-run to "
              "stop after the summary", file=sys.stderr)
        return 1
    files = lower_to_executorch(export.programs, constant_methods(opts), ns.output_dir)
    print("Wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
