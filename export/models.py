"""A Llama-style target and an EAGLE-3 draft head, written for torch.export and int4 weights.

Every linear is an ``nn.Linear`` without bias so that torchao's ``quantize_`` finds it; the KV
caches are buffers updated in place at ``input_pos`` so that torch.export records the mutation. The
token embedding is shared by target and draft, as in EAGLE-3.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 512
    vocab_size: int = 512
    max_seq_len: int = 128
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # EAGLE-3 feeds the draft the hidden states entering these target layers (low, mid, high).
    eagle_layers: tuple[int, int, int] = (1, 2, 3)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("dim must divide into n_heads, and n_heads into n_kv_heads")
        if not all(0 < layer < self.n_layers for layer in self.eagle_layers):
            raise ValueError(f"eagle_layers {self.eagle_layers} must lie in 1..{self.n_layers - 1}")


CONFIGS = {
    "tiny": ModelArgs(),
    # Llama 3 8B shapes with EAGLE-3's taps (2, n/2, n-3); random weights.
    "llama3-8b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
        max_seq_len=2048, eagle_layers=(2, 16, 29),
    ),
}


def with_layers(args: ModelArgs, n_layers: int) -> ModelArgs:
    """``args`` with ``n_layers`` decoder layers (a quicker model of the same layer shapes), EAGLE-3's
    taps at its first, middle and last layer."""
    if n_layers < 2:
        raise ValueError(f"EAGLE-3 taps layers 1 .. n_layers - 1, so n_layers must be at least 2, got {n_layers}")
    return dataclasses.replace(args, n_layers=n_layers, eagle_layers=(1, n_layers // 2, n_layers - 1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32: bf16 sums of squares lose the small components.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_angles(input_pos: torch.Tensor, head_dim: int, theta: float):
    """cos and sin [T, head_dim / 2] for the positions; computed in fp32 in the graph, not stored
    as buffers, which a bf16 model would round."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=input_pos.device)
    angles = input_pos.float()[:, None] / (theta ** (exponents / head_dim))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, T, H, D] by the angles of its positions (interleaved pairs, as in Llama)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        shape = (1, args.n_kv_heads, args.max_seq_len, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # In-place index_put_ is a buffer mutation that torch.export lifts and ExecuTorch keeps.
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    """Grouped-query attention over a static KV cache of ``max_seq_len`` positions."""

    def __init__(self, args: ModelArgs, in_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(in_dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(in_dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(in_dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache = KVCache(args)
        self.register_buffer("cache_positions", torch.arange(args.max_seq_len), persistent=False)

    def forward(self, x, input_pos, cos, sin):
        bsz, seqlen, _ = x.shape
        q = apply_rope(self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        k_all, v_all = self.kv_cache.update(input_pos, k.transpose(1, 2), v.transpose(1, 2))
        # Causal over absolute positions: row t sees cache entries 0..input_pos[t].
        mask = self.cache_positions[None, :] <= input_pos[:, None]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_all, v_all, attn_mask=mask[None, None], enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, args.dim)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, input_pos, cos, sin):
        h = x + self.attention(self.attention_norm(x), input_pos, cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Target(nn.Module):
    """The target model after its token embedding: returns logits and EAGLE-3's three taps."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, h, input_pos):
        cos, sin = rope_angles(input_pos, self.args.head_dim, self.args.rope_theta)
        inputs = []  # each layer's input; a layer tapped twice (few layers) gives both taps
        for layer in self.layers:
            inputs.append(h)
            h = layer(h, input_pos, cos, sin)
        return self.output(self.norm(h)), torch.cat([inputs[i] for i in self.args.eagle_layers], dim=-1)


class EagleDraft(nn.Module):
    """EAGLE-3 draft head: one decoder layer over [embedding, hidden] with its own KV cache.

    Its first step of a chain projects the target's three taps (3 * dim) to ``dim`` with ``fc``;
    later steps feed back the draft's own hidden state instead, as EAGLE-3 does.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.fc = nn.Linear(3 * args.dim, args.dim, bias=False)
        self.input_norm = RMSNorm(args.dim, args.norm_eps)
        self.hidden_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, 2 * args.dim)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, embeds, input_pos, target_hidden, draft_hidden, from_target):
        hidden = torch.where(from_target, self.fc(target_hidden), draft_hidden)
        cos, sin = rope_angles(input_pos, self.args.head_dim, self.args.rope_theta)
        x = torch.cat((self.input_norm(embeds), self.hidden_norm(hidden)), dim=-1)
        h = hidden + self.attention(x, input_pos, cos, sin)
        h = h + self.feed_forward(self.ffn_norm(h))
        return self.output(self.norm(h)), h


class EagleModel(nn.Module):
    """Target + draft; each public method is one method of the exported program."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.target = Target(args)
        self.draft = EagleDraft(args)
        if args.tie_word_embeddings:
            self.target.output.weight = self.tok_embeddings.weight

    def prefill(self, tokens, input_pos):
        """tokens [1, T], input_pos [T] -> (logits [1, T, V], taps [1, T, 3 * dim])."""
        return self.target(self.tok_embeddings(tokens), input_pos)

    # The same computation, exported for a static chain_len + 1 tokens (which the pass routes), and
    # optionally for one token: plain decoding, the baseline speculative decoding is measured against.
    target_verify = prefill
    target_decode = prefill

    def draft_decode(self, tokens, input_pos, target_hidden, draft_hidden, from_target):
        """One draft step.

        tokens [1, 1], input_pos [1];
        target_hidden [1, 1, 3 * dim]: the target's taps at the last accepted position;
        draft_hidden [1, 1, dim]: the hidden state the previous draft step returned;
        from_target [1] bool: use target_hidden (first step of a chain) or draft_hidden.
        Returns (logits [1, 1, V], hidden [1, 1, dim]).
        """
        return self.draft(self.tok_embeddings(tokens), input_pos, target_hidden, draft_hidden,
                          from_target)


# The submodules each method uses. An exported method holds only these, under the names they have
# in EagleModel, so that a weight or KV cache has one FQN in every method that touches it.
METHOD_PARTS = {
    "prefill": ("tok_embeddings", "target"),
    "target_verify": ("tok_embeddings", "target"),
    "target_decode": ("tok_embeddings", "target"),
    "draft_decode": ("tok_embeddings", "draft"),
}


NAN_TOKEN = -1  # the token of a row whose logits hold a NaN (argmax alone would return its index)


class MethodModule(nn.Module):
    """One method of an EagleModel as a module that torch.export can trace.

    It returns what a greedy decoding loop reads: (tokens, features), where tokens [1, T] int64 are
    each row's argmax, computed on the GPU inside the program, so that the logits (T x V) never
    cross to the host, and features are the method's second output (taps or hidden). A row whose
    logits hold a NaN gets NAN_TOKEN instead of the NaN's index, so that a runner can refuse it. With
    ``logits`` the logits follow as a third output (host-side sampling, numerics checks).
    """

    def __init__(self, model: EagleModel, method: str, *, logits: bool = False):
        super().__init__()
        for part in METHOD_PARTS[method]:
            self.add_module(part, getattr(model, part))
        self._method = getattr(model, method)
        self._logits = logits

    def forward(self, *args):
        logits, features = self._method(*args)
        tokens = torch.where(logits.isnan().any(-1), NAN_TOKEN, logits.argmax(-1))
        return (tokens, features, logits) if self._logits else (tokens, features)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Build the parameters in bf16 directly: an fp32 Llama 3 8B would need 32 GB first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(args: ModelArgs, *, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> EagleModel:
    """A randomly initialized EagleModel; the same seed gives the same weights."""
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        return EagleModel(args).eval()


def quantize_int4(model: nn.Module, group_size: int) -> nn.Module:
    """Every nn.Linear to torchao int4 weights (symmetric, per group); embeddings stay bf16."""
    config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    quantize_(model, config)
    return model
