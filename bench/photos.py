"""Photographs at the sizes cameras take them: the image front end with and without
JPEG drafting (``ImageConfig.draft_gap``), same run, same photographs.

The held-out photographs (core/training/photo_eval.py) are resized to a shorter side
of 756, 1512 and 3024 pixels (a 12 MP phone photo is 4032x3024) and saved as JPEG
(quality 92). For each size, per photograph, alternating rounds:

- decode + resize + crop (``decode_image`` then ``image_to_pixels``) with every pixel
  decoded (``draft_gap=None``) and with the default draft, ms per photograph and the
  ratio;
- then the front end and the image tower's forward together (batch 16), images/s:
  what one image worker's model process can do, both ways;
- how far the drafted pixels are from the full decode's (mean and max of |diff| on the
  [-1, 1] scale), the embeddings' least cosine, and whether the zero-shot top-1 over the
  held-out labels is the same for every photograph.

    .venv/bin/python bench/photos.py [--sides 756,1512,3024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.model.image import decode_image, image_to_pixels  # noqa: E402
from core.model.multimodal import MultimodalModel  # noqa: E402
from core.model.zeroshot import FRONT_END  # noqa: E402
from core.serving.procs import keep_freed_memory  # noqa: E402
from core.training import photo_eval as pe  # noqa: E402


def full_decode():
    """The front end with every pixel decoded (no JPEG draft)."""
    return replace(FRONT_END, draft_gap=None)


def at_side(img: Image.Image, side: int) -> bytes:
    w, h = img.size
    f = side / min(w, h)
    buf = io.BytesIO()
    img.convert("RGB").resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC).save(
        buf, "JPEG", quality=92)
    return buf.getvalue()


def pixels(datas: list[bytes], cfg) -> list[torch.Tensor]:
    return [image_to_pixels(decode_image(d, cfg), cfg) for d in datas]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="756,1512,3024", help="shorter sides, pixels")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    keep_freed_memory()  # mmq's model runs so in its model process (core/serving/procs.py)
    torch.set_num_threads(2)
    full_cfg = full_decode()
    model = MultimodalModel.load(device="cpu")
    tower = model.towers["image"]
    tower.load()
    labels = pe.labels_of(pe.HELD_OUT)
    photos = [pe.load_photo(p) for p in pe.HELD_OUT]
    print(f"{len(photos)} held-out photographs as JPEG, 2 threads, {args.rounds} alternating "
          f"rounds; draft_gap {FRONT_END.draft_gap} against every pixel decoded")
    head = (f"{'shorter side':>12} {'front end ms (full / draft)':>28} {'ratio':>6} "
            f"{'images/s with forward':>22} {'ratio':>6} {'|diff| mean / max':>18} "
            f"{'min cos':>8} {'same top-1':>10}")
    print("\n" + head + "\n" + "-" * len(head))
    for side in [int(s) for s in args.sides.split(",")]:
        datas = [at_side(p, side) for p in photos]
        front: dict[str, list[float]] = {"full": [], "draft": []}
        whole: dict[str, list[float]] = {"full": [], "draft": []}
        for r in range(args.rounds):
            order = ("full", "draft") if r % 2 == 0 else ("draft", "full")
            for name in order:
                cfg = full_cfg if name == "full" else FRONT_END
                front[name].append(timed(lambda c=cfg, d=datas: pixels(d, c)) / len(datas))
                whole[name].append(len(datas) / timed(
                    lambda c=cfg, d=datas: tower.photo(torch.stack(pixels(d, c)))))
        full_px, draft_px = pixels(datas, full_cfg), pixels(datas, FRONT_END)
        diff = [(a - b).abs() for a, b in zip(full_px, draft_px, strict=True)]
        with torch.inference_mode():
            ef, ed = (tower.photo(torch.stack(px)).float() for px in (full_px, draft_px))
        cos = (ef * ed).sum(-1).min().item()
        same = _same_top1(model, datas, labels)
        fm, dm = statistics.median(front["full"]), statistics.median(front["draft"])
        fw, dw = statistics.median(whole["full"]), statistics.median(whole["draft"])
        print(f"{side:>12} {fm * 1000:>14.1f} / {dm * 1000:<11.1f} {fm / dm:>5.2f}x "
              f"{fw:>10.1f} / {dw:<9.1f} {dw / fw:>5.2f}x "
              f"{statistics.mean(d.mean().item() for d in diff):>8.4f} / "
              f"{max(d.max().item() for d in diff):<7.3f} {cos:>8.5f} {same:>10}")


def _same_top1(model: MultimodalModel, datas: list[bytes], labels: list[str]) -> str:
    """Zero-shot top-1 over the held-out labels, drafted against every pixel decoded."""
    import core.model.zeroshot as zs

    drafted = model.classify("image", datas, labels, top_k=1)
    keep = zs.FRONT_END
    zs.FRONT_END = full_decode()  # the tower's prepare reads the module's front end
    try:
        full = model.classify("image", datas, labels, top_k=1)
    finally:
        zs.FRONT_END = keep
    n = sum(a[0][0] == b[0][0] for a, b in zip(drafted, full, strict=True))
    return f"{n}/{len(datas)}"


if __name__ == "__main__":
    main()
