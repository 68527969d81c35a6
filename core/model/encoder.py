"""Transformer encoder layers that run on packed tokens.

Every tower (text, image, audio) is a stack of these layers. Projections and the
MLP see ``(N, C)`` packed tokens only, never padding; attention is the one place
that needs sequence boundaries, and it gets them from an ``AttentionPlan``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.model.attention import AttentionPlan, packed_attention_qkv
from core.model.fused import fusable, linear_add, linear_gelu, plain_linear


def bucket_rows(n: int) -> int:
    """The row count a CPU forward of ``n`` packed tokens is padded to.

    oneDNN builds (JIT-compiles) a primitive per input shape and keeps it in a cache
    of 1024 entries, and its buffers fragment glibc's heap: with the batch's token
    count as the row count, nearly every batch is a new shape, and a worker's model
    process grew by hundreds of MiB over a 10,000-job backlog without levelling off.
    Rounded up to 16 steps per doubling (steps of at least 8 rows), a 2,048-token
    budget has 80 shapes in all and memory stays flat (600 random batches offline:
    +840 MiB and climbing before, +160 MiB and flat after). The filler is at most
    1/16 of the rows past 128 tokens, 2% on average from 1,000 to 2,048; batches
    ran as fast within noise (+-5%), the primitives now being reused. Steps of 8,
    not 16, for small batches: a lone sentence of ~22 tokens padded to 32 rows
    took 5-10% longer (bench/e2e.py's unbatched worker), to 24 rows 1-4%."""
    step = max(8, (1 << max(0, n - 1).bit_length()) // 32)
    return -(-n // step) * step


@dataclass(frozen=True)
class EncoderConfig:
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 12
    mlp_dim: int = 1536
    # BERT normalises after each residual add (post-LN); Whisper's audio encoder
    # normalises before each block (pre-LN), so each tower says which it uses.
    norm_first: bool = False
    ln_eps: float = 1e-12
    # "gelu" is BERT's exact erf GELU; the tanh approximation would break parity.
    activation: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
        self.cfg = cfg
        # q, k and v in one matmul: one pass over the activations instead of three.
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln_attn = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.ln_mlp = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        # The dtype the four matmuls (and attention) run in when it is not the residual
        # stream's: bf16 with an fp32 stream (core/model/precision.py). None = x's own.
        self.matmul_dtype: torch.dtype | None = None

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.matmul_dtype is None else x.to(self.matmul_dtype)

    def attention(self, x: torch.Tensor, plan: AttentionPlan, impl: str,
                  residual: torch.Tensor) -> torch.Tensor:
        """residual + attention(x)"""
        N, C = x.shape
        nh, hs = self.cfg.n_heads, self.cfg.head_dim
        qkv = plain_linear(self._down(x), self.qkv).view(N, 3, nh, hs)  # (N, 3, nh, hs)
        if self.matmul_dtype is not None and qkv.device.type == "cpu":
            # bf16 matmuls, fp32 attention on the C kernel: CPU SDPA in bf16 gathers and
            # pads every group and was half of a bf16 forward (profiled, 64-sentence
            # batches); q, k, v are only (N, 3C), so the casts cost little.
            qkv = qkv.float()  # (N, 3, nh, hs)
        y = self._down(packed_attention_qkv(qkv, plan, impl))  # (N, nh, hs)
        # bf16: the projection's bf16 output is added to the fp32 residual (promoted)
        return linear_add(y.reshape(N, C), self.proj, residual)

    def mlp(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + fc2(gelu(fc1(x)))"""
        h = linear_gelu(self._down(x), self.fc1)  # (N, mlp_dim)
        return linear_add(h, self.fc2, residual)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, impl: str = "auto") -> torch.Tensor:
        if self.cfg.norm_first:
            x = self.attention(self.ln_attn(x), plan, impl, residual=x)
            return self.mlp(self.ln_mlp(x), residual=x)
        x = self.ln_attn(self.attention(x, plan, impl, residual=x))
        return self.ln_mlp(self.mlp(x, residual=x))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, x: torch.Tensor, plan: AttentionPlan, impl: str = "auto") -> torch.Tensor:
        N, C = x.shape
        fill = bucket_rows(N) - N if fusable(x) else 0  # fp32 CPU inference only
        if fill:  # a sequence of its own: no real token attends to the filler rows
            x = torch.cat([x, x.new_zeros(fill, C)])  # (N + fill, C)
            plan = plan.with_filler(fill)
        for layer in self.layers:
            x = layer(x, plan, impl)
        return x[:N]  # (N, C)


def mean_pool(x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """(N, C) packed tokens -> (B, C) per-sequence means over real tokens."""
    N, C = x.shape
    B = len(plan.lengths)
    sums = x.new_zeros(B, C).index_add_(0, plan.seq_ids, x)  # (B, C)
    lens = torch.tensor(plan.lengths, dtype=x.dtype, device=x.device)
    return sums / lens[:, None]
