"""The packed attention core vs padding, on sentence-like mixed lengths (5-128 tokens).

Two tables, both measured in this run on the same random batches:

1. attention alone: each packed path (grouped SDPA, the C kernel, nested tensors)
   vs the padded reference (tokens/s, ratio);
2. a 6-layer MiniLM-sized encoder: packed tokens (projections and MLP on real
   tokens, attention on the default path) vs the usual padded encoder (every layer on B x T
   with a key mask, as Hugging Face BERT runs), tokens/s counting real tokens.

    .venv/bin/python bench/attention.py [--batch-sizes 1,8,32,128] [--reps 20]
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from core.model.attention import AttentionPlan, packed_attention_qkv
from core.model.encoder import Encoder, EncoderConfig


def sentence_lengths(rng: random.Random, n: int) -> list[int]:
    return [max(5, min(128, int(math.exp(rng.gauss(math.log(20), 0.6))))) for _ in range(n)]


def padded_encoder(enc: Encoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The padded baseline: (B, T, C) through every layer, keys masked in attention."""
    B, T, C = x.shape
    for layer in enc.layers:
        nh, hs = layer.cfg.n_heads, layer.cfg.head_dim
        q, k, v = layer.qkv(x).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = layer.ln_attn(x + layer.proj(y.transpose(1, 2).reshape(B, T, C)))
        x = layer.ln_mlp(x + layer.fc2(F.gelu(layer.fc1(x))))
    return x


def rate(tokens: int, reps: int, fn, *args) -> float:
    fn(*args)
    t = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return tokens * reps / (time.perf_counter() - t)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8,32,128")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(0)
    cfg = EncoderConfig()  # all-MiniLM-L6-v2's shape: 6 layers, 384 wide, 12 heads
    enc = Encoder(cfg).eval()
    nh, hs = cfg.n_heads, cfg.head_dim
    print(f"torch threads {torch.get_num_threads()}; lengths log-normal, median 20, 5-128\n")
    impls = ("grouped", "kernel", "nested")
    print(f"{'batch':>5} {'tokens':>6} {'pad %':>6} | {'attn ref':>9} "
          + "".join(f"{i:>9} {'x':>5} " for i in impls)
          + f"| {'enc padded':>10} {'packed':>9} {'x':>5}   (k tok/s)")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        lengths = sentence_lengths(rng, bs)
        lengths.sort(reverse=True)  # the model packs longest first
        plan = AttentionPlan.from_lengths(lengths)
        N, T = sum(lengths), max(lengths)
        qkv = torch.randn(N, 3, nh, hs)
        reps = max(2, args.reps * 32 // bs)
        attn = {impl: rate(N, reps, packed_attention_qkv, qkv, plan, impl)
                for impl in ("reference", *impls)}
        x = torch.randn(N, cfg.dim)
        gather, mask = plan.pad_all()
        xp = torch.cat([x, x.new_zeros(1, cfg.dim)])[gather].view(bs, T, cfg.dim)
        packed = rate(N, reps, enc, x, plan)
        padded = rate(N, reps, padded_encoder, enc, xp, mask)
        print(f"{bs:>5} {N:>6} {100 * (1 - N / (bs * T)):>5.0f}% | "
              f"{attn['reference'] / 1e3:>9.1f} "
              + "".join(f"{attn[i] / 1e3:>9.1f} {attn[i] / attn['reference']:>5.2f} "
                        for i in impls)
              + f"| {padded / 1e3:>10.1f} {packed / 1e3:>9.1f} {packed / padded:>5.2f}")


if __name__ == "__main__":
    main()
