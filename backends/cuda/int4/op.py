"""Registers ``torch.ops.et_int4.et_int4_plain_mm``: a fake kernel for export, the W4A8 reference
on CPU, and the shim library on CUDA. Which linears use the op is the pass's business (limits.py).
"""

from __future__ import annotations

import torch

from .... import runtime
from ....runtime.aoti import QUALIFIED_OP_NAME
from .packing import weight_shape
from .reference import check_w4a8_args, w4a8_reference

__all__ = ["et_int4_plain_mm"]

# The shim reads dense row-major operands. The tag makes Inductor (AOTI, ExecuTorch's CUDA backend)
# pass them so, whatever graph calls the op: a strided activation such as one half of
# h.chunk(2, -1) is copied first, and only where it is strided.
torch.library.define(
    QUALIFIED_OP_NAME,
    "(Tensor self, Tensor qdata, Tensor scale, Tensor zero, int group_size, int max_m) -> Tensor",
    tags=(torch.Tag.needs_contiguous_strides,),
)


@torch.library.register_fake(QUALIFIED_OP_NAME)
def _fake(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
          group_size: int, max_m: int) -> torch.Tensor:
    check_w4a8_args(x, qdata, scale, zero, group_size, max_m)
    return x.new_empty((x.shape[0], weight_shape(qdata)[0]))


@torch.library.impl(QUALIFIED_OP_NAME, "CPU")
def _cpu(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
         group_size: int, max_m: int) -> torch.Tensor:
    check_w4a8_args(x, qdata, scale, zero, group_size, max_m)
    return w4a8_reference(x, qdata, scale, zero, group_size)


@torch.library.impl(QUALIFIED_OP_NAME, "CUDA")
def _cuda(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
          group_size: int, max_m: int) -> torch.Tensor:
    check_w4a8_args(x, qdata, scale, zero, group_size, max_m)
    # Eager calls get no layout constraint from the tag: make them dense here (a no-op when they are).
    return runtime.plain_mm(x.contiguous(), qdata.contiguous(), scale.contiguous(), zero.contiguous(),
                            group_size, max_m)


et_int4_plain_mm = torch.ops.et_int4.et_int4_plain_mm
