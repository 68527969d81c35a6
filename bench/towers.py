"""Image and audio tower throughput, and packed vs padded on ragged audio.

1. ``model.embed("image" | "audio")`` at batch sizes 1, 8, 32, 128: images/s and
   audio-seconds/s, front end (decode, resample, log-mel) included.
2. The audio tower alone on ragged clips of 1-30 s: packed tokens vs the usual
   padded batch (every clip padded to the longest, keys masked), same weights,
   same run; audio-seconds/s and the ratio.

    .venv/bin/python bench/towers.py [--batch-sizes 1,8,32,128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import random
import time

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from core import datasets as ds
from core.model import MultimodalModel
from core.towers import PatchTower
from core.train import digit_png


def speechlike_wav(seconds: float, rng: np.random.Generator) -> bytes:
    """Noise shaped by a slow random envelope: cheap, any length, not silence."""
    n = int(seconds * 16000)
    env = np.interp(np.arange(n), np.linspace(0, n, 20), rng.random(20))
    buf = io.BytesIO()
    sf.write(buf, (0.3 * env * rng.standard_normal(n)).astype(np.float32), 16000,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def padded_tower(tower: PatchTower, patches: torch.Tensor, n: list[int]) -> torch.Tensor:
    """The padded baseline: (B, T+1, C) through every pre-LN layer, keys masked."""
    B, T, C = len(n), max(n) + 1, tower.cfg.encoder.dim
    x = patches.new_zeros(B, T, C)
    mask = torch.zeros(B, T, dtype=torch.bool)
    s = 0
    for b, k in enumerate(n):
        x[b, 1:k + 1] = tower.patch_proj(patches[s:s + k])
        mask[b, :k + 1] = True
        s += k
    x[:, 0] = tower.cls
    x = x + tower.pos_emb[:T]
    for layer in tower.encoder.layers:
        nh, hs = layer.cfg.n_heads, layer.cfg.head_dim
        h = layer.ln_attn(x)
        q, k, v = layer.qkv(h).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + layer.proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + layer.fc2(F.gelu(layer.fc1(layer.ln_mlp(x))))
    x = tower.ln_out(x) * mask[..., None]
    return F.normalize(tower.head(x.sum(1) / mask.sum(1, keepdim=True)), dim=-1)


def best(rounds: int, fn, *args) -> float:
    """Least time of several passes: the machine is shared and its speed drifts."""
    fn(*args)
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t)
    return min(out)


def embed_in_batches(model: MultimodalModel, modality: str, items: list, bs: int) -> None:
    for i in range(0, len(items), bs):
        model.embed(modality, items[i:i + bs])


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8,32,128")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    model = MultimodalModel.load(device="cpu")
    x, _ = ds.digits(32)
    pngs = [digit_png(x[i]) for i in range(256)]
    secs = [float(s) for s in rng.uniform(0.5, 3.0, 256)]  # spoken-command-like clips
    wavs = [speechlike_wav(s, rng) for s in secs]
    print(f"model {model.version}, torch threads {torch.get_num_threads()}\n")
    print(f"{'batch':>5} {'images/s':>9} {'audio clips/s':>14} {'audio s/s':>10}")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        n = max(bs, 64)
        ti = best(args.rounds, embed_in_batches, model, "image", pngs[:n], bs)
        ta = best(args.rounds, embed_in_batches, model, "audio", wavs[:n], bs)
        print(f"{bs:>5} {n / ti:>9.1f} {n / ta:>14.1f} {sum(secs[:n]) / ta:>10.1f}")

    print("\naudio tower alone, ragged clips of 1-30 s (uniform): packed vs padded")
    print(f"{'batch':>5} {'audio s':>8} {'pad %':>6} {'padded s/s':>11} {'packed s/s':>11} "
          f"{'x':>5}")
    tower = model.towers.audio
    r = random.Random(0)
    for bs in (8, 32):
        lens_s = [r.uniform(1, 30) for _ in range(bs)]
        n = [int(s * 25) for s in lens_s]  # 25 patches per second at the defaults
        patches = torch.randn(sum(n), tower.cfg.patch_dim)
        packed = best(args.rounds, tower, patches, n)
        padded = best(args.rounds, padded_tower, tower, patches, n)
        pad = 1 - sum(n) / (bs * max(n))
        print(f"{bs:>5} {sum(lens_s):>8.0f} {100 * pad:>5.0f}% {sum(lens_s) / padded:>11.0f} "
              f"{sum(lens_s) / packed:>11.0f} {padded / packed:>5.2f}")


if __name__ == "__main__":
    main()
