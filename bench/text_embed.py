"""Text embedding throughput: mmq's packed text tower vs sentence-transformers.

Both run in this process on the same sentences, at the same batch sizes, with
the same torch thread count. Prints sentences/s per batch size, the ratio of our
best to theirs, and useful GFLOP/s (real tokens only) against a plain matmul
measured in the same run.

    .venv/bin/python bench/text_embed.py [--n 2000] [--batch-sizes 1,16,32,64,256]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from core.model import MultimodalModel
from core.samples import sentences
from core.text import default_text_path


def useful_flops(lengths: list[int], dim: int, mlp: int, layers: int) -> float:
    """Multiply-adds x2 in projections, MLP and attention, counting real tokens only."""
    n = sum(lengths)
    linear = 2 * n * (3 * dim * dim + dim * dim + 2 * dim * mlp)
    attn = 2 * 2 * sum(length * length for length in lengths) * dim
    return layers * (linear + attn)


def matmul_gflops(m: int = 4096, k: int = 384, n: int = 1536, reps: int = 20) -> float:
    a, b = torch.randn(m, k), torch.randn(n, k)
    F.linear(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        F.linear(a, b)
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def timed(fn, sents: list[str], bs: int) -> float:
    fn(sents[: max(bs, 32)])  # warm-up: allocator, thread pool, tokenizer caches
    t = time.perf_counter()
    for i in range(0, len(sents), bs):
        fn(sents[i: i + bs])
    return len(sents) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-sizes", default="1,16,32,64,256")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    from sentence_transformers import SentenceTransformer

    sents = sentences(args.n, seed=1)
    model = MultimodalModel.load(device="cpu")
    st = SentenceTransformer(str(default_text_path()), device="cpu")
    lengths = [r.tokens for r in model.embed_items("text", sents)]
    cfg = model.text.cfg.encoder
    flops = useful_flops(lengths, cfg.dim, cfg.mlp_dim, cfg.n_layers)
    peak = matmul_gflops()
    print(f"{len(sents)} sentences, {sum(lengths)} tokens (mean {sum(lengths)/len(sents):.1f}, "
          f"max {max(lengths)}), torch threads {torch.get_num_threads()}, "
          f"matmul {peak:.0f} GFLOP/s")

    def ours(batch: list[str]) -> None:
        model.embed("text", batch)

    def theirs(bs: int) -> float:
        # sentence-transformers at its best: the whole list in one call, which it
        # sorts by length before batching, so its batches carry little padding.
        st.encode(sents[:bs], batch_size=bs)
        t = time.perf_counter()
        st.encode(sents, batch_size=bs, convert_to_tensor=True)
        return len(sents) / (time.perf_counter() - t)

    rows = []
    for bs in sizes:
        # ours gets batches in arrival order, as a worker does: no global sort.
        a, b = timed(ours, sents, bs), theirs(bs)
        rows.append((bs, a, b))
    print(f"\n{'batch':>6} {'mmq sent/s':>11} {'s-t sent/s':>11} {'ratio':>6} "
          f"{'mmq GFLOP/s':>12} {'% matmul':>9}")
    for bs, a, b in rows:
        g = flops / (len(sents) / a) / 1e9
        print(f"{bs:>6} {a:>11.1f} {b:>11.1f} {a / b:>6.2f} {g:>12.1f} {100 * g / peak:>8.0f}%")
    best_a = max(rows, key=lambda r: r[1])
    best_b = max(rows, key=lambda r: r[2])
    print(f"\nbest mmq {best_a[1]:.1f}/s (batch {best_a[0]}) vs best sentence-transformers "
          f"{best_b[2]:.1f}/s (batch {best_b[0]}): {best_a[1] / best_b[2]:.2f}x")


if __name__ == "__main__":
    main()
