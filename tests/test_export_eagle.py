"""The EAGLE-3 export: argument checks, routing per method, numerics of the rewritten programs.

CPU tests use the tiny config with a short KV cache and share one export (module fixture, with
target_decode). The
``cuda`` tests lower through ExecuTorch's CUDA backend and PyTorch's AOTI runtime.
"""

from __future__ import annotations

import importlib.util
import itertools
import runpy
from pathlib import Path

import et_int4
import pytest
import torch
from et_int4 import runtime
from et_int4.export import export_eagle as cli
from et_int4.export.export_eagle import DECODE_METHOD, METHODS, ExportOptions, export_eagle
from et_int4.export.models import NAN_TOKEN, MethodModule, build_model
from numerics import rel_error

CHAIN_LEN = 3
# With the logits (third output) that the numerics tests compare; the greedy tokens come first.
OPTIONS = ExportOptions(config="tiny", chain_len=CHAIN_LEN, matvec_max_m=4, max_seq_len=32, target_decode=True,
                        logits=True)
ARGV = ["--chain-len", "3", "--matvec-max-m", "4", "--max-seq-len", "32", "--target-decode", "--logits"]
N_TARGET_LINEARS = OPTIONS.model_args.n_layers * 7 + 1  # q k v o, w1 w2 w3 per layer; lm_head
N_DRAFT_LINEARS = 9  # fc, q k v o, w1 w2 w3, lm_head


@pytest.fixture(scope="module")
def exported():
    return export_eagle(OPTIONS)


@pytest.mark.slow
def test_lowered_methods_agree_on_every_name_they_share(exported):
    # ExecuTorch's CUDA backend shares constants across methods by name, and to_edge names the scalars it
    # lifts by a per-program counter: two methods must never hold different tensors under one name.
    exir = pytest.importorskip("executorch.exir")
    config = exir.EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)
    tensors = {}
    for name, program in exported.programs.items():
        edge = exir.to_edge(program, compile_config=config).exported_program()
        tensors[name] = {**edge.state_dict, **edge.constants}
    for a, b in itertools.combinations(tensors, 2):
        for key in tensors[a].keys() & tensors[b].keys():
            x, y = tensors[a][key], tensors[b][key]
            assert (x.dtype, x.shape) == (y.dtype, y.shape) and torch.equal(x, y), f"{key}: {a} vs {b}"


def _kv_buffers(module):
    return {name: buf for name, buf in module.named_buffers()
            if name.endswith(("k_cache", "v_cache"))}


def _reset_caches(*modules):
    for module in modules:
        for buf in _kv_buffers(module).values():
            buf.zero_()


def _tokens(n):
    return torch.randint(0, OPTIONS.model_args.vocab_size, (1, n))


def _draft_inputs(from_target: bool):
    dim = OPTIONS.model_args.dim
    return (_tokens(1), torch.tensor([5]), torch.randn(1, 1, 3 * dim, dtype=torch.bfloat16),
            torch.randn(1, 1, dim, dtype=torch.bfloat16), torch.tensor([from_target]))


# -- routing ---------------------------------------------------------------------------------------

def test_verify_decode_and_draft_are_routed_prefill_is_not(exported):
    summary = {s.name: s for s in exported.summary}
    assert list(summary) == [*METHODS, DECODE_METHOD]
    for target in ("target_verify", DECODE_METHOD):
        assert len(summary[target].routed) == N_TARGET_LINEARS
        assert summary[target].kept == ()
    assert len(summary["draft_decode"].routed) == N_DRAFT_LINEARS
    assert summary["draft_decode"].kept == ()
    assert summary["prefill"].routed == ()
    assert len(summary["prefill"].kept) == N_TARGET_LINEARS


def _calls_op(ep):
    return sum(n.target == torch.ops.et_int4.et_int4_plain_mm.default for n in ep.graph.nodes)


def test_programs_call_the_op_as_summarized(exported):
    for s in exported.summary:
        assert _calls_op(exported.programs[s.name]) == len(s.routed), s.name


def test_dry_run(exported, monkeypatch, capsys):
    monkeypatch.setattr(cli, "export_eagle", lambda opts: exported if opts == OPTIONS else None)
    assert cli.main([*ARGV, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "target_verify" in out and "Dry run" in out


def test_without_cuda_stops_after_the_summary(exported, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default --output-dir out/ is made before the export
    monkeypatch.setattr(cli, "export_eagle", lambda opts: exported if opts == OPTIONS else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(ARGV) != 0
    captured = capsys.readouterr()
    assert f"{N_TARGET_LINEARS:3d} routed to et_int4_plain_mm" in captured.out
    assert "needs a CUDA GPU" in captured.err


# -- argument checks -------------------------------------------------------------------------------

# {limit} is the built library's SHIM_GEMM_MAX_M, read when the test runs.
@pytest.mark.parametrize("argv, message", [
    (["--matvec-max-m", "16"],
     "--matvec-max-m 16: MATVEC_MAX_M=16 exceeds SHIM_GEMM_MAX_M={limit}, the largest M the built"),
    (["--chain-len", "8", "--matvec-max-m", "8"], "--chain-len 8 needs --matvec-max-m >= 9"),
    (["--matvec-max-m", "0"], "--matvec-max-m 0: MATVEC_MAX_M must be at least 1"),
    (["--chain-len", "0"], "--chain-len 0 must be at least 1"),
    (["--chain-len", "7", "--matvec-max-m", "4"], "--chain-len 7 needs --matvec-max-m >= 8"),
    (["--group-size", "48"], "--group-size 48: group_size must be a multiple of 32"),
    (["--max-seq-len", "9", "--matvec-max-m", "8"], "--max-seq-len 9 leaves no range for prefill"),
    (["--n-layers", "1"], "--n-layers 1: EAGLE-3 taps layers 1 .. n_layers - 1, so n_layers must be at least 2"),
])
def test_bad_arguments_fail_before_any_work(argv, message, monkeypatch, capsys):
    if et_int4.SHIM_GEMM_MAX_M >= 16 and "16" in argv:
        pytest.skip("the library was built with SHIM_GEMM_MAX_M >= 16")

    def no_work(opts):
        pytest.fail("export_eagle ran despite bad arguments")

    monkeypatch.setattr(cli, "export_eagle", no_work)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message.format(limit=et_int4.SHIM_GEMM_MAX_M) in err[-1]


def test_unwritable_output_dir_fails_before_any_work(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(cli, "export_eagle", lambda opts: pytest.fail("exported into an unwritable folder"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*ARGV, "--output-dir", str(blocker / "out")])
    assert exit_info.value.code == 2
    assert f"--output-dir {blocker / 'out'} cannot be written" in capsys.readouterr().err


def _program_with_a_ptd(n: int):
    """A real ExecuTorch program whose weights go to a .ptd (made on CPU); its .pte differs with n."""
    from executorch.exir import ExecutorchBackendConfig, to_edge

    ep = torch.export.export(torch.nn.Linear(8, n), (torch.randn(2, 8),))
    return to_edge(ep).to_executorch(ExecutorchBackendConfig(external_constants=True))


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_outputs_are_replaced_as_a_pair_or_not_at_all(monkeypatch, tmp_path):
    first = cli.write_program(_program_with_a_ptd(4), tmp_path)
    assert [f.name for f in first] == [cli.PTE_NAME, "_default_external_constant.ptd"]
    old = _contents(tmp_path)
    assert old.keys() == {f.name for f in first}
    newer = _program_with_a_ptd(6)

    def fail_after_the_pte(program, outdir):
        raise OSError("injected: no space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(type(newer), "write_tensor_data_to_file", fail_after_the_pte)
        with pytest.raises(OSError, match="injected"):
            cli.write_program(newer, tmp_path)
    assert _contents(tmp_path) == old  # the old pair, nothing half-written beside it
    cli.write_program(newer, tmp_path)
    new = _contents(tmp_path)
    assert new.keys() == old.keys() and all(new[name] != old[name] for name in new)


# Functions of the largest SHIM_GEMM_MAX_M CMake accepts, which is read from the library when a test runs.
@pytest.mark.parametrize("argv_for", [lambda bound: ["--matvec-max-m", str(bound + 1)],
                                      lambda bound: ["--chain-len", str(bound)],
                                      lambda bound: ["--chain-len", str(bound), "--matvec-max-m", "4"]],
                         ids=["matvec-max-m", "chain-len", "chain-len-and-matvec-max-m"])
def test_no_message_suggests_a_build_cmake_refuses(argv_for, monkeypatch, capsys):
    bound = runtime.shim_gemm_max_m_bound()
    argv = argv_for(bound)
    monkeypatch.setattr(cli, "export_eagle", lambda opts: pytest.fail("ran despite bad arguments"))
    with pytest.raises(SystemExit):
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rebuild" not in err and f"no build handles more than {bound} rows" in err, err


@pytest.mark.parametrize("run", [
    lambda: runpy.run_path(str(Path(__file__).parents[1] / "export" / "export_eagle.py"),
                           run_name="__main__"),
    lambda: runpy.run_module("et_int4.export.export_eagle", run_name="__main__"),
], ids=["file", "module"])
def test_runs_as_a_script(run, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["export_eagle.py", "--matvec-max-m", "0"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    assert "--matvec-max-m 0: MATVEC_MAX_M must be at least 1" in capsys.readouterr().err


def test_default_limit_routes_the_verify_window():
    opts, _ = cli.parse_options(cli.build_parser(), ["--chain-len", "5"])
    assert opts.matvec_max_m == max(et_int4.get_matvec_max_m(), 6)
    assert opts.min_prefill_len == opts.matvec_max_m + 1


def test_fewer_layers_keep_the_config_shapes():
    opts, _ = cli.parse_options(cli.build_parser(), ["--config", "llama3-8b", "--n-layers", "4"])
    args = opts.model_args
    assert (args.n_layers, args.eagle_layers, args.dim, args.ffn_dim) == (4, (1, 2, 3), 4096, 14336)


@pytest.mark.parametrize("n_layers", [2, 3, 4])
def test_the_target_taps_three_hidden_states_at_any_layer_count(n_layers):
    # The draft's fc takes 3 * dim; with 2 or 3 layers two taps fall on one layer, and each still counts
    # (a 2-layer Llama-shaped program once gave 1 * dim taps, which eagle_runner refused).
    from et_int4.export.models import CONFIGS, Target, with_layers
    args = with_layers(CONFIGS["tiny"], n_layers)
    target = Target(args)
    h = torch.randn(1, 3, args.dim)
    with torch.no_grad():
        _, taps = target(h, torch.arange(3))
    assert taps.shape == (1, 3, 3 * args.dim)


def test_the_bench_refuses_too_few_layers_with_the_models_check(capsys):
    path = Path(__file__).parents[1] / "bench" / "bench_eagle_runner.py"
    spec = importlib.util.spec_from_file_location("bench_eagle_runner", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["export", "--layers", "1", "--dir", "unused"])
    assert exit_info.value.code == 2
    assert "--layers 1: EAGLE-3 taps layers 1 .. n_layers - 1" in capsys.readouterr().err


def test_methods_return_greedy_tokens_and_features_by_default():
    """The loop's outputs only: each row's argmax as int64, then the taps or hidden state; the
    logits (rows x vocab) stay on the device unless --logits asks for them."""
    opts = ExportOptions(config="tiny", chain_len=CHAIN_LEN, matvec_max_m=4, max_seq_len=32)
    assert not opts.logits and cli.parse_options(cli.build_parser(), ARGV)[0].logits
    model = build_model(opts.model_args)
    tokens, pos = _tokens(CHAIN_LEN + 1), torch.arange(CHAIN_LEN + 1)
    with torch.no_grad():
        greedy, taps = MethodModule(model, "target_verify")(tokens, pos)
        ref_logits, ref_taps = model.target_verify(tokens, pos)
    assert greedy.dtype == torch.int64 and torch.equal(greedy, ref_logits.argmax(-1))
    assert torch.equal(taps, ref_taps)
    assert cli.constant_methods(opts)["get_vocab_size"] == opts.model_args.vocab_size
    model.target.norm.weight.data[0] = float("nan")  # every row's logits then hold NaN
    with torch.no_grad():
        greedy, _ = MethodModule(model, "target_verify")(tokens, pos)
    assert (greedy == NAN_TOKEN).all(), "a NaN row must not pass for the NaN's index"


def test_target_decode_is_off_by_default():
    opts, _ = cli.parse_options(cli.build_parser(), ["--chain-len", "3"])
    assert not opts.target_decode and opts.methods == METHODS


def test_no_rewrite_leaves_every_linear_as_exported_without_routing(monkeypatch, capsys):
    opts, _ = cli.parse_options(cli.build_parser(), [*ARGV, "--n-layers", "2", "--no-rewrite"])
    monkeypatch.setattr(cli, "explain_int4_linears", lambda *a, **k: pytest.fail("explained routing not done"))
    export = export_eagle(opts)
    assert all(export.programs[name] is export.exported[name] for name in opts.methods)
    assert export.summary == []
    cli.print_summary(export.summary)
    assert "no rewrite" in capsys.readouterr().out


# -- numerics --------------------------------------------------------------------------------------

def test_target_verify_matches_eager(exported):
    model = exported.model
    verify = exported.programs["target_verify"].module()
    tokens, pos = _tokens(CHAIN_LEN + 1), torch.arange(CHAIN_LEN + 1)
    _reset_caches(model, verify)
    with torch.no_grad():
        greedy, taps, logits = verify(tokens, pos)
        ref_logits, ref_taps = model.target_verify(tokens, pos)
    assert greedy.dtype == torch.int64 and torch.equal(greedy, logits.argmax(-1))
    # W4A8 (the op) against W4A16 (eager dequant + linear).
    assert rel_error(logits, ref_logits) < 5e-2
    assert rel_error(taps, ref_taps) < 5e-2
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("from_target", [True, False])
def test_draft_decode_matches_eager(exported, from_target):
    model = exported.model
    draft = exported.programs["draft_decode"].module()
    inputs = _draft_inputs(from_target)
    _reset_caches(model, draft)
    with torch.no_grad():
        greedy, hidden, logits = draft(*inputs)
        ref_logits, ref_hidden = model.draft_decode(*inputs)
    assert greedy.shape == (1, 1) and torch.equal(greedy, logits.argmax(-1))
    assert rel_error(logits, ref_logits) < 5e-2
    assert rel_error(hidden, ref_hidden) < 5e-2


def test_target_decode_is_row_0_of_target_verify(exported):
    """Plain decoding over the same KV cache: target_decode's one row is target_verify's first (the
    op's reference treats rows independently)."""
    verify = exported.programs["target_verify"].module()
    decode = exported.programs[DECODE_METHOD].module()
    assert _kv_buffers(verify).keys() == _kv_buffers(decode).keys()
    tokens, pos = _tokens(CHAIN_LEN + 1), torch.arange(5, 5 + CHAIN_LEN + 1)
    _reset_caches(verify, decode)
    with torch.no_grad():
        verify_greedy, verify_taps, verify_logits = verify(tokens, pos)
        decode_greedy, decode_taps, decode_logits = decode(tokens[:, :1], pos[:1])
    assert decode_logits.shape == (1, 1, OPTIONS.model_args.vocab_size)
    assert rel_error(decode_logits[0, 0], verify_logits[0, 0]) < 1e-2
    assert rel_error(decode_taps[0, 0], verify_taps[0, 0]) < 1e-2
    assert decode_greedy[0, 0] == verify_greedy[0, 0]


def test_prefill_is_left_untouched(exported):
    original = exported.exported["prefill"].module()
    rewritten = exported.programs["prefill"].module()
    tokens, pos = _tokens(OPTIONS.min_prefill_len + 2), torch.arange(OPTIONS.min_prefill_len + 2)
    _reset_caches(original, rewritten)
    with torch.no_grad():
        for out, ref in zip(rewritten(tokens, pos), original(tokens, pos)):
            assert torch.equal(out, ref)


@pytest.mark.parametrize("rewritten", [False, True], ids=["exported", "rewritten"])
def test_kv_cache_is_shared_between_prefill_and_verify(exported, rewritten):
    """prefill(prompt) then target_verify(next chain_len + 1 tokens) == prefill(all of them).

    ExecuTorch's CUDA backend shares a buffer between methods by its FQN; carry the caches the
    same way here.
    """
    programs = exported.programs if rewritten else exported.exported
    prefill, verify = programs["prefill"].module(), programs["target_verify"].module()
    assert _kv_buffers(prefill).keys() == _kv_buffers(verify).keys()
    n, k = OPTIONS.min_prefill_len + 3, CHAIN_LEN + 1
    tokens = _tokens(n + k)
    _reset_caches(prefill, verify)
    with torch.no_grad():
        prefill(tokens[:, :n], torch.arange(n))
        for name, buf in _kv_buffers(verify).items():
            buf.copy_(_kv_buffers(prefill)[name])
        _, taps, logits = verify(tokens[:, n:], torch.arange(n, n + k))
        _reset_caches(prefill)
        _, ref_taps, ref_logits = prefill(tokens, torch.arange(n + k))
    ref_logits, ref_taps = ref_logits[:, n:], ref_taps[:, n:]
    tolerance = 5e-2 if rewritten else 1e-2  # W4A8 verify against W4A16 prefill, or bf16 rounding
    assert rel_error(logits, ref_logits) < tolerance
    assert rel_error(taps, ref_taps) < tolerance
    agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
    assert agreement >= (0.75 if rewritten else 1.0)


# -- lowering ------------------------------------------------------------------------------------

def test_lowering_up_to_aoti(exported, monkeypatch, tmp_path):
    """Edge conversion, partitioning and serialization on CPU, with AOTInductor stubbed out.

    Each method becomes one CUDA delegate; the op reaches the backend (with the op registered in
    both of its tables) in target_verify, target_decode and draft_decode only; method 0 is draft_decode.
    """
    pytest.importorskip("triton", reason="ExecuTorch's CUDA backend imports triton")
    from et_int4.runtime import aoti
    from executorch.backends.cuda.cuda_backend import CudaBackend
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.backend.backend_details import BackendDetails, PreprocessResult

    seen = {}

    def preprocess(cls, program, compile_specs):
        ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        shims = cls.get_aoti_compile_options(compile_specs)["aot_inductor.custom_ops_to_c_shims"]
        seen[cls.method_name_from_compile_specs(compile_specs)] = (
            sum(aoti.OP_NAME in op for op in ops),
            torch.ops.et_int4.et_int4_plain_mm.default in shims
            and aoti.c_shim_name("cuda") in cls.get_supported_fallback_kernels(),
        )
        return PreprocessResult(processed_bytes=b"", debug_handle_map={})

    monkeypatch.setattr(CudaBackend, "preprocess", classmethod(preprocess))
    monkeypatch.setattr(CudaBackend, "preprocess_multimethod",
                        BackendDetails.__dict__["preprocess_multimethod"])
    files = cli.lower_to_executorch(exported.programs, cli.constant_methods(OPTIONS), tmp_path)
    routed = {s.name: len(s.routed) for s in exported.summary}
    assert seen == {name: (routed[name], True) for name in OPTIONS.methods}
    plans = deserialize_pte_binary(files[0].read_bytes()).program.execution_plan
    assert [p.name for p in plans] == [*sorted(OPTIONS.methods), *cli.constant_methods(OPTIONS)]
    assert all(len(p.delegates) == 1 for p in plans[:len(OPTIONS.methods)])


# -- GPU: ExecuTorch CUDA lowering and PyTorch's AOTI runtime -------------------------------------

GPU_ARGV = ["--matvec-max-m", "8", "--max-seq-len", "64"]
SHIM_SYMBOL = b"aoti_torch_cuda_et_int4_plain_mm"


def _so_blobs_per_method(pte_path):
    """method -> the AOTI shared objects its delegates load.

    The CUDA backend stores each compiled .so as named data whose key ends in ``_so_blob``: a
    content hash that the delegate's processed bytes name (ExecuTorch >= 1.3), or
    ``<method>_so_blob`` (1.2).
    """
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(pte_path.read_bytes())
    store = pte.named_data
    blobs = {key: bytes(store.buffers[entry.buffer_index])
             for key, entry in store.pte_data.items() if key.endswith("_so_blob")}
    result = {}
    for plan in pte.program.execution_plan:
        for delegate in plan.delegates:
            processed = bytes(pte.program.backend_delegate_data[delegate.processed.index].data)
            result.setdefault(plan.name, []).extend(
                so for key, so in blobs.items()
                if key.encode() in processed or key == f"{plan.name}_so_blob")
    return result


@pytest.mark.cuda
def test_full_export_calls_the_shim_in_verify_and_draft_only(tmp_path):
    assert cli.main([*GPU_ARGV, "--output-dir", str(tmp_path)]) == 0
    pte = tmp_path / cli.PTE_NAME
    assert pte.is_file() and (tmp_path / "aoti_cuda_blob.ptd").is_file()
    blobs = _so_blobs_per_method(pte)
    assert all(blobs.get(name) for name in METHODS), f"no .so found for some method: {blobs.keys()}"
    calling = {name for name in METHODS if any(SHIM_SYMBOL in so for so in blobs[name])}
    assert calling == {"target_verify", "draft_decode"}


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["target_verify", "draft_decode"])
def test_aoti_runtime_matches_the_rewritten_program(method, tmp_path):
    import et_int4.runtime
    from et_int4.runtime.aoti import custom_ops_to_c_shims
    from torch.export.passes import move_to_device_pass

    et_int4.runtime.load()
    opts, _ = cli.parse_options(cli.build_parser(), GPU_ARGV)
    program = move_to_device_pass(export_eagle(opts).programs[method], "cuda:0")
    inputs = ((_tokens(opts.chain_len + 1), torch.arange(opts.chain_len + 1))
              if method == "target_verify" else _draft_inputs(from_target=True))
    inputs = tuple(t.cuda() for t in inputs)
    eager = program.module()
    _reset_caches(eager)  # the compiled package starts from the exported (zero) caches too
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / f"{method}.pt2"),
        inductor_configs={"aot_inductor.custom_ops_to_c_shims": custom_ops_to_c_shims("cuda"),
                          "emulate_precision_casts": True})
    compiled = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        expected = eager(*inputs)
        actual = compiled(*inputs)
    # The same kernel on both sides; only Inductor's fusions around it differ.
    assert len(actual) == len(expected) == 2  # greedy tokens and the features, no logits
    assert rel_error(actual[1], expected[1]) < 1e-2
    assert (actual[0] == expected[0]).float().mean() >= 0.75
