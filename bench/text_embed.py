"""Text embedding throughput: mmq's packed text tower vs sentence-transformers.

Both run in this process on the same sentences, at the same batch sizes, with
the same torch thread count. Prints sentences/s per batch size, the ratio of our
best to theirs, and useful GFLOP/s (real tokens only) against a plain matmul
measured in the same run.

    .venv/bin/python bench/text_embed.py [--n 2000] [--batch-sizes 1,16,32,64,256] [--rounds 2]
        [--precisions fp32,bf16,int8,auto]

``--precisions``: one mmq column per text precision (MMQ_TEXT_PRECISION, resolved on
this machine: ``auto`` shows what it picked), each ratio against sentence-transformers.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from core.config import Settings
from core.model.multimodal import MultimodalModel
from core.model.text import default_text_path
from core.serving.procs import keep_freed_memory
from core.training.samples import sentences


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


def mode_of(model: MultimodalModel) -> str:
    """The text precision a loaded model runs (its version's tag; none = fp32)."""
    text = model.version.split("+")[0]
    return text.rpartition("/")[2] if "/" in text else "fp32"


def best_rate(fn, rounds: int) -> float:
    """Best of several timed passes: the machine is shared, and the minimum time is
    the least disturbed estimate of what the code itself costs."""
    return max(fn() for _ in range(rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-sizes", default="1,16,32,64,256")
    ap.add_argument("--rounds", type=int, default=2, help="passes per config; best is kept")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated text precisions: fp32, bf16, int8, auto")
    args = ap.parse_args()
    keep_freed_memory()  # mmq's model runs so in its model process (core/serving/procs.py)
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    from sentence_transformers import SentenceTransformer

    sents = sentences(args.n, seed=1)
    models = {p: MultimodalModel.load(device="cpu", settings=Settings(text_precision=p))
              for p in args.precisions.split(",")}
    model = next(iter(models.values()))
    st = SentenceTransformer(str(default_text_path()), device="cpu")
    lengths = [r.tokens for r in model.embed_items("text", sents)]
    cfg = model.text.cfg.encoder
    flops = useful_flops(lengths, cfg.dim, cfg.mlp_dim, cfg.n_layers)
    peak = matmul_gflops()
    print(f"{len(sents)} sentences, {sum(lengths)} tokens (mean {sum(lengths)/len(sents):.1f}, "
          f"max {max(lengths)}), torch threads {torch.get_num_threads()}, "
          f"matmul {peak:.0f} GFLOP/s, best of {args.rounds} passes")

    def ours(bs: int, model: MultimodalModel) -> float:
        # Batches in arrival order, as a worker gets them: no global sort.
        model.embed("text", sents[:bs])
        t = time.perf_counter()
        for i in range(0, len(sents), bs):
            model.embed("text", sents[i: i + bs])
        return len(sents) / (time.perf_counter() - t)

    def theirs(bs: int, tok_parallel: str) -> float:
        # sentence-transformers at its best: the whole list in one call, which it
        # sorts by length before batching, so its batches carry little padding.
        # Measured with the Rust tokenizer's threads on (its default) and off
        # (mmq's setting, which also helps it on 2 cores).
        os.environ["TOKENIZERS_PARALLELISM"] = tok_parallel
        try:
            st.encode(sents[:bs], batch_size=bs)
            t = time.perf_counter()
            st.encode(sents, batch_size=bs, convert_to_tensor=True)
            return len(sents) / (time.perf_counter() - t)
        finally:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

    # Quality of each mode against fp32 on the same sentences: the bound is
    # cosine >= 0.999 for every embedding (tests/core/model/test_precision.py checks it).
    ref = (models.get("fp32") or MultimodalModel.load(device="cpu")).embed("text", sents)
    quality = {}
    for p, m in models.items():
        cos = F.cosine_similarity(m.embed("text", sents), ref, dim=-1)  # (N,)
        quality[p] = (cos.min().item(), cos.mean().item(), int((cos < 0.999).sum()))

    rows = []
    for bs in sizes:
        # Alternated per batch size, so that a noisy neighbour hurts every column alike.
        a = [best_rate(lambda bs=bs, m=m: ours(bs, m), args.rounds) for m in models.values()]
        b = best_rate(lambda bs=bs: theirs(bs, "true"), args.rounds)
        c = best_rate(lambda bs=bs: theirs(bs, "false"), args.rounds)
        rows.append((bs, a, b, c))
    names = [f"auto={mode_of(m)}" if p == "auto" else p for p, m in models.items()]
    print(f"\n{'batch':>6} " + " ".join(f"{'mmq ' + n:>14}" for n in names) +
          f" {'s-t sent/s':>11} {'s-t serial tok':>15} " +
          " ".join(f"{'ratio ' + n:>12}" for n in names) + f" {'GFLOP/s ' + names[0]:>14}")
    for bs, a, b, c in rows:
        g = flops / (len(sents) / a[0]) / 1e9
        print(f"{bs:>6} " + " ".join(f"{x:>14.1f}" for x in a) + f" {b:>11.1f} {c:>15.1f} " +
              " ".join(f"{x / max(b, c):>12.2f}" for x in a) + f" {g:>14.1f}")
    theirs_best = max(max(r[2], r[3]) for r in rows)
    print(f"\nmatmul peak fp32 {peak:.0f} GFLOP/s; best sentence-transformers {theirs_best:.1f}/s")
    print(f"\n{'mode':<12} {'best sent/s':>11} {'batch':>6} {'vs s-t':>7} {'vs fp32':>8} "
          f"{'cos min':>8} {'cos mean':>9} {'n<0.999':>8}")
    fp32_best = max(r[1][0] for r in rows)
    for i, (n, p) in enumerate(zip(names, models, strict=True)):
        best = max(rows, key=lambda r, i=i: r[1][i])
        cmin, cmean, bad = quality[p]
        print(f"{n:<12} {best[1][i]:>11.1f} {best[0]:>6} {best[1][i] / theirs_best:>6.2f}x "
              f"{best[1][i] / fp32_best:>7.2f}x {cmin:>8.5f} {cmean:>9.6f} {bad:>8}")
    if names[0] != "fp32":
        print(f"(vs fp32 is against the first column, {names[0]})")

if __name__ == "__main__":
    main()
