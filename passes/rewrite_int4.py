"""Routes the small-M int4 linears of a ``torch.export`` program to ``et_int4_plain_mm``.

torchao's ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(gs))`` linears export as

    dequantize_affine(access_subclass_inner_tensor(p_weight, "qdata"), [1, gs],
                      access_subclass_inner_tensor(p_weight, "scale"),
                      access_subclass_inner_tensor(p_weight, "zero_point"),
                      torch.int8, -8, 7, torch.bfloat16) -> aten.linear(x, w[, bias])

With M = prod(x.shape[:-1]) rows, a linear whose M can never exceed ``MATVEC_MAX_M`` becomes

    reshape(x, [-1, K]) -> et_int4_plain_mm(x2d, qdata4, scale, zero, gs, MATVEC_MAX_M) -> reshape [..., N]

with the repacked weight as new buffers of the program (named after the weight). A linear whose M is
always larger (prefill) stays dequantize_affine + linear (W4A16), but reads the same packed buffers:

    unpack_tiled(qdata4, scale, zero) (reshapes, permutes, nibble masks in the graph)
        -> dequantize_affine(qdata, [1, gs], scale, zero_point, ...) -> aten.linear(x, w[, bias])

bit-identical to the original, and the torchao weight leaves the program. So every method exported
from one model holds the same weights under the same names, once: ExecuTorch's CUDA backend shares
them across methods by name (docs/ARCHITECTURE.md says why a mix of shared and unshared weights in a
method is a hazard as well as a waste). A dynamic M whose range straddles the limit is an error: one
graph cannot take both paths.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    TensorArgument,
)
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.value_ranges import bound_sympy

from ..backends.cuda.int4.limits import DispatchLimitError, resolve_matvec_max_m
from ..backends.cuda.int4.op import et_int4_plain_mm
from ..backends.cuda.int4.packing import (
    TILE_ROWS,
    check_group_size,
    pack_torchao_weight,
    unpack_tiled,
    weight_shape,
)

__all__ = ["Int4LinearDecision", "explain_int4_linears", "rewrite_int4_linears"]

_aten = torch.ops.aten
# Matched by name: neither op need be registered (torchao imported) for the pass to load.
_DEQUANTIZE_AFFINE = "torchao::dequantize_affine"
_ACCESS_INNER = "export::access_subclass_inner_tensor"
_WEIGHT_FIELDS = ("qdata", "scale", "zero_point")
_LIFTED_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
# Metadata the new nodes inherit from the linear they replace (not source_fn_stack: a partitioner
# would take them for a linear).
_INHERITED_META = ("nn_module_stack", "stack_trace")


@dataclasses.dataclass(frozen=True)
class Int4LinearDecision:
    """What the pass does with one int4 linear.

    Attributes:
        name: the linear's module path, e.g. ``layers.0.mlp.up_proj``.
        m_min, m_max: the range of its row count M = prod(x.shape[:-1]); ``m_max`` is ``math.inf``
            when the export leaves it unbounded.
        routed: True when it becomes ``et_int4_plain_mm``. False for a matched linear of larger M
            too: it stays dequantize + linear, over the packed weights (``reason`` says which).
        reason: why.
    """

    name: str
    m_min: int
    m_max: int | float
    routed: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class _Int4Linear:
    linear: fx.Node
    dequantize: fx.Node
    inner: tuple[fx.Node, ...]  # the access_subclass_inner_tensor nodes
    weight: fx.Node  # the weight's placeholder
    group_size: int


def explain_int4_linears(ep: ExportedProgram, *, matvec_max_m: int | None = None
                         ) -> list[Int4LinearDecision]:
    """The pass's decision for each int4 linear of ``ep``, in graph order; changes nothing.

    ``matvec_max_m`` None uses the current ``MATVEC_MAX_M``. Raises ``DispatchLimitError`` where
    :func:`rewrite_int4_linears` would.
    """
    return [decision for decision, _ in _plan(ep, resolve_matvec_max_m(matvec_max_m))]


def rewrite_int4_linears(ep: ExportedProgram, *, matvec_max_m: int | None = None) -> ExportedProgram:
    """A new program in which the int4 linears with M <= ``MATVEC_MAX_M`` call ``et_int4_plain_mm``.

    ``ep`` is left unchanged. ``matvec_max_m`` None uses the current ``MATVEC_MAX_M`` (see
    ``et_int4.matvec_max_m``); an explicit value is checked the same way and applies to this call
    only. Raises ``DispatchLimitError`` for a linear whose dynamic M straddles the limit.
    """
    limit = resolve_matvec_max_m(matvec_max_m)
    _plan(ep, limit)  # raise before paying for the copy
    program = _copy_program(ep)
    # Every match is rewritten: routed to the op, or (larger M) dequantized from the packed weights.
    plan = [(decision.routed, match) for decision, match in _plan(program, limit) if match is not None]
    if not plan:
        return program
    # New nodes get their meta["val"] from the mode that traced the program.
    fake_mode = plan[0][1].linear.args[0].meta["val"].fake_mode
    return _Rewriter(program, limit, fake_mode).run(plan)


def _plan(ep: ExportedProgram, limit: int) -> list[tuple[Int4LinearDecision, _Int4Linear | None]]:
    plan = []
    for node in ep.graph.nodes:
        if not (node.op == "call_function" and node.target == _aten.linear.default
                and _is_op(node.args[1], _DEQUANTIZE_AFFINE)):
            continue
        name = _module_path(node)
        m_min, m_max = _row_range(ep, node.args[0])
        match, why_not = _match(ep, node)
        rows = f"M = {m_min}" if m_min == m_max else f"M in [{m_min}, {m_max}]"
        if match is None:
            decision = Int4LinearDecision(name, m_min, m_max, False, why_not)
        elif m_max <= limit:
            decision = Int4LinearDecision(
                name, m_min, m_max, True,
                f"{rows} <= MATVEC_MAX_M={limit}: et_int4_plain_mm (W4A8)")
        elif m_min > limit:
            decision = Int4LinearDecision(
                name, m_min, m_max, False,
                f"{rows} > MATVEC_MAX_M={limit}: stays dequantize_affine + linear (W4A16), reading "
                f"the packed weights (unpacked in the graph)")
        else:
            raise DispatchLimitError(
                f"int4 linear {name}: M = prod(x.shape[:-1]) ranges over [{m_min}, {m_max}], which "
                f"straddles MATVEC_MAX_M={limit}; one graph cannot route M <= {limit} to "
                f"et_int4_plain_mm and larger M to dequantize + linear. Fix: raise the dynamic "
                f"dimension's minimum above the limit (e.g. Dim(..., min={limit + 1})) for a prefill "
                f"export, cap its maximum at the limit (Dim(..., max={limit})) for a decode export, "
                f"or split the export into one method per range")
        plan.append((decision, match))
    return plan


def _is_op(node: object, name: str) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload) and node.target.name() == name)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path
    return node.name


def _row_range(ep: ExportedProgram, x: fx.Node) -> tuple[int, int | float]:
    rows = x.meta["val"].shape[:-1]
    if all(isinstance(d, int) for d in rows):
        m = math.prod(rows)
        return m, m
    expr = sympy.Mul(*(d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d) for d in rows))
    bounds = bound_sympy(expr, ep.range_constraints)
    # A symbol without a range (unbacked) bounds nothing: M is only known to be >= 0.
    lower = 0 if bounds.lower.is_negative or bounds.lower in (-int_oo, -sympy.oo) else int(bounds.lower)
    upper = math.inf if bounds.upper in (int_oo, sympy.oo) else int(bounds.upper)
    return lower, upper


def _input_spec(ep: ExportedProgram, placeholder: fx.Node) -> InputSpec:
    return next(s for s in ep.graph_signature.input_specs if s.arg.name == placeholder.name)


def _lifted_tensor(ep: ExportedProgram, placeholder: fx.Node) -> torch.Tensor | None:
    spec = _input_spec(ep, placeholder)
    if spec.kind not in _LIFTED_KINDS:
        return None
    return ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]


def _match(ep: ExportedProgram, linear: fx.Node) -> tuple[_Int4Linear | None, str]:
    """The linear's int4 pattern, or None and why it is left alone."""
    dequantize = linear.args[1]
    args = dequantize.normalized_arguments(ep.graph_module, normalize_to_only_use_kwargs=True).kwargs
    out_dtype = args.get("output_dtype", torch.float32)
    if (args.get("input_dtype"), args.get("quant_min"), args.get("quant_max")) != (torch.int8, -8, 7):
        return None, (f"weights are not int4 (dequantize_affine of torch.int8 in [-8, 7]), got "
                      f"{args.get('input_dtype')} in [{args.get('quant_min')}, {args.get('quant_max')}]")
    x_dtype = linear.args[0].meta["val"].dtype
    if (x_dtype, out_dtype) != (torch.bfloat16, torch.bfloat16):
        return None, (f"the kernel takes bfloat16 activations and weights, got activations {x_dtype} "
                      f"and weights dequantized to {out_dtype}")
    inner = tuple(args[key] for key in ("input", "scale", "zero_point"))
    if not all(_is_op(n, _ACCESS_INNER) for n in inner):
        return None, "the weight is not a torchao tensor-subclass parameter (IntxUnpackedToInt8Tensor)"
    weight = inner[0].args[0]
    tensor = _lifted_tensor(ep, weight) if weight.op == "placeholder" else None
    if any(n.args != (weight, field) for n, field in zip(inner, _WEIGHT_FIELDS)) or tensor is None:
        return None, "qdata, scale and zero_point are not the inner tensors of one weight parameter"
    k = linear.args[0].meta["val"].shape[-1]
    block_size = list(args["block_size"])
    if len(block_size) != 2 or block_size[0] != 1:
        return None, f"the kernel takes weights quantized per group along K (block_size [1, gs]), got {block_size}"
    group_size = block_size[1]
    try:
        check_group_size(group_size, k)
    except ValueError as error:
        return None, str(error)
    if tensor.qdata.shape[0] % TILE_ROWS:
        return None, (f"the kernel takes weights in tiles of {TILE_ROWS} output rows, got "
                      f"N={tensor.qdata.shape[0]}")
    if (tensor.scale.dtype, tensor.zero_point.dtype) != (torch.bfloat16, torch.int8):
        return None, (f"the kernel takes bfloat16 scales and int8 zero points, got "
                      f"{tensor.scale.dtype} and {tensor.zero_point.dtype}")
    return _Int4Linear(linear, dequantize, inner, weight, group_size), ""


def _copy_program(ep: ExportedProgram) -> ExportedProgram:
    """A copy of the graph and its signature that shares every weight, buffer and constant with
    ``ep``: the rewrite adds packed tensors, it never needs a second copy of the model."""
    shared = [*ep.state_dict.values(), *ep.constants.values()]
    program = copy.deepcopy(ep, memo={id(t): t for t in shared})
    # Copying the graph renames placeholders that shadow builtins (``input`` -> ``input_1``),
    # which would no longer match the graph signature.
    for original, copied in zip(_placeholders(ep.graph), _placeholders(program.graph)):
        copied.name = original.name
    return program


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


class _Rewriter:
    """Rewrites the matched linears of ``program`` (already a private copy) in place."""

    def __init__(self, program: ExportedProgram, limit: int, fake_mode: FakeTensorMode) -> None:
        self.program = program
        self.graph = program.graph
        self.limit = limit
        self.fake_mode = fake_mode
        self.new_buffers: dict[str, torch.Tensor] = {}
        self.new_specs: dict[str, InputSpec] = {}
        # One set of packed tensors per weight placeholder: tied weights are packed once, and
        # unpacked once for all their dequantize + linear users.
        self.packed: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}
        self.unpacked: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}

    def run(self, plan: list[tuple[bool, _Int4Linear]]) -> ExportedProgram:
        for routed, match in plan:
            if routed:
                self._route(match)
            else:
                self._dequantize_packed(match)
        removed = self._erase_unused([match for _, match in plan])
        return self._program(removed)

    def _dequantize_packed(self, match: _Int4Linear) -> None:
        """Feed the linear's dequantize_affine torchao's qdata, scale and zero_point unpacked from the
        packed buffers: the same values, so the same results, and no second copy of the weight."""
        if match.weight not in self.unpacked:
            packed = self._packed_for(match.weight)
            traced = make_fx(unpack_tiled)(*(node.meta["val"] for node in packed))
            env = dict(zip(_placeholders(traced.graph), packed))
            with self.graph.inserting_before(match.dequantize):
                for node in traced.graph.nodes:
                    if node.op == "call_function":
                        args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                        env[node] = self._emit(match.linear, node.target, *args, **kwargs)
                    elif node.op == "output":
                        self.unpacked[match.weight] = fx.node.map_arg(tuple(node.args[0]), env.__getitem__)
        for old, new in zip(match.inner, self.unpacked[match.weight]):
            match.dequantize.replace_input_with(old, new)

    def _route(self, match: _Int4Linear) -> None:
        linear = match.linear
        x, bias = linear.args[0], (linear.args[2] if len(linear.args) > 2 else None)
        qdata, scale, zero = self._packed_for(match.weight)
        x_val = x.meta["val"]
        k, n = x_val.shape[-1], weight_shape(qdata.meta["val"])[0]
        with self.graph.inserting_before(linear):
            x2d = x if x_val.dim() == 2 else self._emit(linear, _aten.reshape.default, x, [-1, k])
            y = self._emit(linear, et_int4_plain_mm.default, x2d, qdata, scale, zero,
                           match.group_size, self.limit)
            if x_val.dim() != 2:
                rows = [d if isinstance(d, int) else self._emit(linear, _aten.sym_size.int, x, i)
                        for i, d in enumerate(x_val.shape[:-1])]
                y = self._emit(linear, _aten.reshape.default, y, [*rows, n])
            if bias is not None:
                y = self._emit(linear, _aten.add.Tensor, y, bias)
        linear.replace_all_uses_with(y)
        self.graph.erase_node(linear)

    def _emit(self, like: fx.Node, target: torch._ops.OpOverload, *args: object, **kwargs: object) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        vals, kwarg_vals = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*vals, **kwarg_vals)
        node.meta.update({key: like.meta[key] for key in _INHERITED_META if key in like.meta})
        return node

    def _packed_for(self, weight: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
        if weight not in self.packed:
            packed = pack_torchao_weight(_lifted_tensor(self.program, weight))
            base = _input_spec(self.program, weight).target
            with self.graph.inserting_before(self._first_user_input()):
                self.packed[weight] = tuple(
                    self._add_buffer(f"{base}_et_int4_{field}", tensor)
                    for field, tensor in (("qdata", packed.qdata), ("scale", packed.scale),
                                          ("zero", packed.zero)))
        return self.packed[weight]

    def _first_user_input(self) -> fx.Node:
        users = {s.arg.name for s in self.program.graph_signature.input_specs
                 if s.kind == InputKind.USER_INPUT}
        return next(n for n in self.graph.nodes
                    if n.op != "placeholder" or n.name in users)

    def _add_buffer(self, target: str, tensor: torch.Tensor) -> fx.Node:
        """A persistent buffer named after the weight it packs. A buffer, not a lifted tensor constant:
        AOTInductor names constants by their FQN only for parameters and buffers (others become
        `_tensor_constant<i>`, numbered per program), and ExecuTorch's CUDA backend shares tensors
        across methods by that name, so generic names would collide between methods."""
        taken = self.program.state_dict.keys() | self.program.constants.keys() | self.new_buffers.keys()
        unique, i = target, 0
        while unique in taken:
            i += 1
            unique = f"{target}_{i}"
        node = self.graph.placeholder("b_" + unique.replace(".", "_"))
        node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        self.new_buffers[unique] = tensor
        self.new_specs[node.name] = InputSpec(
            kind=InputKind.BUFFER, arg=TensorArgument(name=node.name), target=unique, persistent=True)
        return node

    def _erase_unused(self, matches: list[_Int4Linear]) -> set[str]:
        """Erase the dequantize chains left without users; the targets of the removed weights."""
        dead = [m.dequantize for m in matches] + [n for m in matches for n in m.inner]
        dead += [m.weight for m in matches]
        removed = set()
        for node in dict.fromkeys(dead):  # ordered, once each; users before what they use
            if not node.users:
                if node.op == "placeholder":
                    removed.add(_input_spec(self.program, node).target)
                self.graph.erase_node(node)
        return removed

    def _program(self, removed: set[str]) -> ExportedProgram:
        program = self.program
        old_specs = {s.arg.name: s for s in program.graph_signature.input_specs}
        # A rewritten linear that was an output is one now under its replacement's name.
        outputs = next(n for n in reversed(self.graph.nodes) if n.op == "output").args[0]
        signature = ExportGraphSignature(
            input_specs=[old_specs.get(n.name) or self.new_specs[n.name] for n in _placeholders(self.graph)],
            output_specs=[
                dataclasses.replace(spec, arg=TensorArgument(name=node.name))
                if isinstance(spec.arg, TensorArgument) else spec
                for spec, node in zip(program.graph_signature.output_specs, outputs)
            ],
        )
        constants = {k: v for k, v in program.constants.items() if k not in removed}
        state_dict = {k: v for k, v in program.state_dict.items() if k not in removed}
        state_dict.update(self.new_buffers)
        gm = program.graph_module
        self.graph.lint()
        gm.recompile()
        return ExportedProgram(
            root=gm,
            graph=self.graph,
            graph_signature=signature,
            state_dict=state_dict,
            range_constraints=program.range_constraints,
            module_call_graph=program.module_call_graph,
            example_inputs=program.example_inputs,
            constants=constants,
            verifiers=[program.verifier],
        )
