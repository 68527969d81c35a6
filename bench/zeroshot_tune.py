"""The zero-shot choices, swept on the calibration photographs (core/training/photo_eval.py).

Prints top-1 (image -> label) and recall@1 (label -> image) for each variant on
CALIBRATION; pass --held-out to print the same table on HELD_OUT (only to
report, after choosing). Class-name sentences are embedded once per template
(about 11k sentences: minutes on 2 cores), cached in /tmp.

    .venv/bin/python bench/zeroshot_tune.py [--held-out] [--write-bank]

``--write-bank`` writes core/model/weights/imagenet_bank.safetensors for ZeroShotConfig's
defaults from the same sentence embeddings, and exits.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core.model.efficientnet import load_efficientnet_lite0
from core.model.files import sha256_file
from core.model.image import ImageConfig, image_to_pixels
from core.model.multimodal import MultimodalModel
from core.model.text import default_text_path
from core.model.zeroshot import BANK_FILE, ZeroShotConfig, bank_key, class_names
from core.training import photo_eval as pe

# Must hold ZeroShotConfig's templates: --write-bank sums these sentence embeddings.
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
             "a bright photo of a {}.", "{}", "a picture of a {}.")
CACHE = "/tmp/mmq_zeroshot_tune.pt"
# The approximation scales the first term by k: b * k * l.e for b * l.m, k standing in
# for |m|, which the unit embedding no longer carries.
KAPPA = (1.0, 0.7, 0.5, 0.35)
FRONT = ImageConfig(image_size=224, patch_size=32, resize_size=256)


def name_embeddings(model: MultimodalModel, names: list[list[str]]) -> dict:
    if os.path.exists(CACHE):
        return torch.load(CACHE, weights_only=True)
    flat = [n for ns in names for n in ns]
    out = {t: model.embed("text", [t.format(n) for n in flat]) for t in TEMPLATES}
    torch.save(out, CACHE)
    return out


def bank_from(emb: dict, names: list[list[str]], templates, synonyms: bool) -> torch.Tensor:
    owner = torch.tensor([c for c, ns in enumerate(names) for _ in ns])
    first = torch.tensor([i == 0 for ns in names for i in range(len(ns))])
    keep = torch.ones_like(first) if synonyms else first
    e = sum(emb[t] for t in templates)[keep]
    return F.normalize(torch.zeros(1000, e.shape[1]).index_add_(0, owner[keep], e), dim=-1)


def evaluate(scores: torch.Tensor) -> tuple[int, int]:
    """(N, N) image x label scores, the right label on the diagonal -> (top-1, r@1)."""
    n = torch.arange(scores.shape[0])
    return int((scores.argmax(1) == n).sum()), int((scores.argmax(0) == n).sum())


def write_bank(emb: dict, names: list[list[str]]) -> None:
    cfg = ZeroShotConfig()
    bank = bank_from(emb, names, cfg.templates, cfg.synonyms)  # (1000, D)
    text = f"all-MiniLM-L6-v2@{sha256_file(default_text_path() / 'model.safetensors')[:12]}"
    key = bank_key(text, names, cfg)
    save_file({f"bank.{key}": bank.half()}, str(BANK_FILE),
              metadata={"text": text, "templates": repr(cfg.templates)})
    print(f"wrote {BANK_FILE} for {text}, key {key}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--held-out", action="store_true")
    ap.add_argument("--write-bank", action="store_true")
    args = ap.parse_args()
    photos = pe.HELD_OUT if args.held_out else pe.CALIBRATION
    model = MultimodalModel.load(device="cpu")
    names = class_names()
    emb = name_embeddings(model, names)
    if args.write_bank:
        return write_bank(emb, names)
    net = load_efficientnet_lite0()
    with torch.inference_mode():
        px = torch.stack([image_to_pixels(pe.load_photo(p), FRONT) for p in photos])
        logits = net(px)  # (N, 1000)
        labels = pe.labels_of(photos)
        lab_raw = model.embed("text", labels)
        lab_tpl = model.embed("text", [f"a photo of {lb}." for lb in labels])
    print(f"{'templates':>10} {'syn':>3} {'label':>5} {'T':>4} {'b':>4} {'k':>4} "
          f"{'conse5':>7} {'cos':>7} {'xent':>7} {'approx':>7}")
    tsets = {"t0": TEMPLATES[:1], "t4": TEMPLATES[4:5], "t0125": TEMPLATES[:3] + TEMPLATES[5:],
             "all": TEMPLATES}
    for (tn, ts), syn, (ln, lab), T in itertools.product(
            tsets.items(), (False, True), (("raw", lab_raw), ("tpl", lab_tpl),
                                           ("avg", F.normalize(lab_raw + lab_tpl, dim=-1))),
            (0.5, 1.0, 2.0)):
        bank = bank_from(emb, names, ts, syn)
        p = torch.softmax(logits / T, -1)
        top = p.topk(5, -1)
        conse = F.normalize(torch.zeros_like(p).scatter(1, top.indices, top.values) @ bank, dim=-1)
        m = p @ bank
        e = F.normalize(m, dim=-1)
        c5 = evaluate(conse @ lab.T)
        cos = evaluate(e @ lab.T)
        for b, k in itertools.product((5, 10, 20, 40), KAPPA):
            logz = torch.logsumexp(b * lab @ bank.T, -1)
            xent = evaluate(b * m @ lab.T - logz)
            approx = evaluate(k * b * e @ lab.T - logz)
            print(f"{tn:>10} {int(syn):>3} {ln:>5} {T:>4} {b:>4} {k:>4} {c5[0]:>3}/{c5[1]:<3} "
                  f"{cos[0]:>3}/{cos[1]:<3} {xent[0]:>3}/{xent[1]:<3} {approx[0]:>3}/{approx[1]:<3}"
                  f" {m.norm(dim=-1).mean():.2f}")


if __name__ == "__main__":
    main()
