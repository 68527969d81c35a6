"""Transformer encoder layers that run on packed tokens.

Every tower (text, image, audio) is a stack of these layers. Projections and the
MLP see ``(N, C)`` packed tokens only, never padding; attention is the one place
that needs sequence boundaries, and it gets them from an ``AttentionPlan``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.attention import AttentionPlan, packed_attention_qkv


@dataclass(frozen=True)
class EncoderConfig:
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 12
    mlp_dim: int = 1536
    # BERT normalises after each residual add (post-LN); ViT-style towers trained
    # from scratch are steadier with pre-LN, so each tower says which it uses.
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

    def attention(self, x: torch.Tensor, plan: AttentionPlan, impl: str) -> torch.Tensor:
        N, C = x.shape
        nh, hs = self.cfg.n_heads, self.cfg.head_dim
        qkv = self.qkv(x).view(N, 3, nh, hs)  # (N, 3, nh, hs)
        y = packed_attention_qkv(qkv, plan, impl)  # (N, nh, hs)
        return self.proj(y.reshape(N, C))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (N, mlp_dim) in between

    def forward(self, x: torch.Tensor, plan: AttentionPlan, impl: str = "auto") -> torch.Tensor:
        if self.cfg.norm_first:
            x = x + self.attention(self.ln_attn(x), plan, impl)
            return x + self.mlp(self.ln_mlp(x))
        x = self.ln_attn(x + self.attention(x, plan, impl))
        return self.ln_mlp(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, x: torch.Tensor, plan: AttentionPlan, impl: str = "auto") -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, plan, impl)
        return x  # (N, C)


def mean_pool(x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """(N, C) packed tokens -> (B, C) per-sequence means over real tokens."""
    N, C = x.shape
    B = len(plan.lengths)
    sums = x.new_zeros(B, C).index_add_(0, plan.seq_ids, x)  # (B, C)
    lens = torch.tensor(plan.lengths, dtype=x.dtype, device=x.device)
    return sums / lens[:, None]
