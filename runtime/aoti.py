"""How AOTInductor calls the op: the C function names and declarations of the shim's ABI."""

from __future__ import annotations

import torch

OP_NAMESPACE = "et_int4"
OP_NAME = "et_int4_plain_mm"
QUALIFIED_OP_NAME = f"{OP_NAMESPACE}::{OP_NAME}"


def c_shim_name(device: str) -> str:
    """AOTInductor's name for the op's C function: the namespace is dropped."""
    return f"aoti_torch_{device}_{OP_NAME}"


def c_shim_declaration(device: str) -> str:
    """The declaration AOTInductor emits for the call; matches runtime/et_int4_shim.h."""
    return (
        f"AOTITorchError {c_shim_name(device)}(AtenTensorHandle self, AtenTensorHandle qdata, "
        "AtenTensorHandle scale, AtenTensorHandle zero, int64_t group_size, int64_t max_m, "
        "AtenTensorHandle* ret0)"
    )


def custom_ops_to_c_shims(device: str) -> dict:
    """The ``aot_inductor.custom_ops_to_c_shims`` entry that turns the op into a direct C call."""
    op = getattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME).default
    return {op: [c_shim_declaration(device)]}
