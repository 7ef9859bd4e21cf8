"""Small torchao-quantized models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization import IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup
from torchao.quantization.quant_primitives import MappingType


class MLP(nn.Module):
    """Two int4 linears, like a transformer's MLP; the second has a bias."""

    def __init__(self, k: int = 64, hidden: int = 96, n: int = 32) -> None:
        super().__init__()
        self.up_proj = nn.Linear(k, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)))


class Chunked(nn.Module):
    """Each half of ``h.chunk(2, -1)`` feeds a linear: both are strided views of h (row stride 2K)."""

    def __init__(self, k: int = 64, n: int = 32) -> None:
        super().__init__()
        self.up_proj = nn.Linear(k, 2 * k, bias=False)
        self.left = nn.Linear(k, n, bias=False)
        self.right = nn.Linear(k, n, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up_proj(x).chunk(2, -1)
        return self.left(a) + self.right(b)


class Tied(nn.Module):
    """Two linears sharing one weight, each with its own activation (and so its own M)."""

    def __init__(self, k: int = 64, n: int = 64) -> None:
        super().__init__()
        self.first = nn.Linear(k, n, bias=False)
        self.second = nn.Linear(k, n, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(a), self.second(b)


def quantized(model: nn.Module, *, group_size: int = 32, asymmetric: bool = False,
              dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """``model`` in ``dtype`` with int4 per-group weights, quantized in place with fresh random values."""
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    model = model.to(dtype).eval()
    mapping = MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                          mapping_type=mapping))
    if isinstance(model, Tied):
        model.second.weight = model.first.weight
    return model


def export(model: nn.Module, *args: torch.Tensor, dynamic_shapes=None) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=dynamic_shapes)


def mlp_program(m_shape: tuple[int, ...], *, dynamic_shapes=None, **kwargs) -> torch.export.ExportedProgram:
    """The exported quantized MLP for activations of shape ``(*m_shape, 64)``."""
    x = torch.randn(*m_shape, 64, dtype=kwargs.get("dtype", torch.bfloat16))
    return export(quantized(MLP(), **kwargs), x, dynamic_shapes=dynamic_shapes)
