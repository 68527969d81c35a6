"""One forward on every thread, or one forward per thread: the model alone, offline.

A text worker's batcher runs two forwards at once on a CPU, each on half of torch's
threads (``MMQ_MODEL_STREAMS``, ARCHITECTURE.md "Two forwards at once"). This measures
the two ways on the model alone, on the same texts, in alternating rounds: the whole
list to ``MultimodalModel.embed`` on all threads, against its halves embedded at once
by two Python threads on ``threads / 2`` each. On an idle machine they should match;
run something beside it (``--load``: busy Python processes, as a worker and Redis
would be) and the one forward on every thread falls behind.

    .venv/bin/python bench/streams.py [--texts FILE] [--n 3000] [--rounds 4] [--load 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import one_forward, read_texts, two_forwards  # noqa: E402
from core.model.multimodal import MultimodalModel  # noqa: E402

DEFAULT_TEXTS = Path(__file__).resolve().parent / "data" / "short_sentences.txt"


def spin(stop) -> None:  # a busy neighbour: pure Python, one core's worth at most
    while not stop.is_set():
        sum(range(10_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--load", type=int, default=0, help="busy processes beside the model")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    texts = read_texts(args.texts, args.n)
    model = MultimodalModel.load(device="cpu")
    model.embed("text", texts[:64])
    stop = mp.Event()
    busy = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.load)]
    for p in busy:
        p.start()
    rows = []
    try:
        for r in range(args.rounds):  # alternating, so drift hurts both alike
            a, b = ((one_forward, two_forwards) if r % 2 == 0 else (two_forwards, one_forward))
            x, y = a(model, texts, threads), b(model, texts, threads)
            rows.append((x, y) if a is one_forward else (y, x))
    finally:
        stop.set()
        for p in busy:
            p.join(5)
    print(f"{len(texts)} texts ({args.texts.name}), {threads} torch threads, "
          f"{args.load} busy process(es) beside; {model.version.split('+')[0]}")
    print(f"{'round':>5} {'1 forward x ' + str(threads) + ' thr':>18} "
          f"{'2 forwards x ' + str(max(1, threads // 2)) + ' thr':>19} {'ratio':>7}")
    for i, (x, y) in enumerate(rows, 1):
        print(f"{i:>5} {x:>18.1f} {y:>19.1f} {y / x:>6.2f}x")
    xs, ys = sorted(r[0] for r in rows), sorted(r[1] for r in rows)
    mx, my = xs[len(xs) // 2], ys[len(ys) // 2]
    print(f"{'median':>5} {mx:>18.1f} {my:>19.1f} {my / mx:>6.2f}x  (texts/s)")


if __name__ == "__main__":
    main()
