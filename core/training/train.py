"""``mmq train-default``: train the image and audio towers into the text space.

The text tower is frozen. Each image or clip is pulled towards the text embedding
of its label (cross-entropy over the label set at the model's logit scale, plus
a cosine term so that the vectors land near the text vectors themselves, which is
what makes free-text retrieval work). Seeds are fixed; data is built locally.
Evaluation goes through the real front ends (PNG and WAV bytes) on held-out data.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from core.model.audio import AudioConfig, LogMel, decode_audio, frames_to_patches
from core.model.image import ImageConfig, decode_image, image_to_patches, pixels_to_patches
from core.model.towers import PatchTower, TowersCheckpoint, audio_tower_config, image_tower_config
from core.training import datasets as ds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    logit_scale: float = 20.0  # must match ModelConfig.logit_scale used at inference
    lr: float = 1e-3
    weight_decay: float = 0.05
    image_epochs: int = 40
    image_batch: int = 128
    held_out_images: float = 0.3
    audio_epochs: int = 10
    audio_batch: int = 64
    clips_per_voice: int = 2  # per word, accent and variant (random speed and pitch)
    tiny: bool = False  # a minutes-long smoke run for the tests: little data, few steps

    @classmethod
    def tiny_run(cls) -> TrainConfig:
        return cls(image_epochs=2, audio_epochs=2, clips_per_voice=1, tiny=True)


def _schedule(opt: torch.optim.Optimizer, step: int, total: int, lr: float) -> None:
    warm = max(1, total // 20)
    f = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) /
                                                              max(1, total - warm)))
    for g in opt.param_groups:
        g["lr"] = lr * f


def _loss(emb: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
          scale: float) -> torch.Tensor:
    logits = scale * emb @ targets.T  # (B, n_labels)
    return F.cross_entropy(logits, labels) + (1 - (emb * targets[labels]).sum(-1)).mean()


def _fit(tower: PatchTower, batches: Callable[[int], list], n_steps: int, cfg: TrainConfig,
         targets: torch.Tensor, what: str) -> None:
    opt = torch.optim.AdamW(tower.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tower.train()
    t0 = time.perf_counter()
    for step in range(n_steps):
        patches, n_patches, labels = batches(step)
        _schedule(opt, step, n_steps, cfg.lr)
        loss = _loss(tower(patches, n_patches), labels, targets, cfg.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == n_steps - 1:
            log.info("%s step %d/%d loss %.3f (%.0f s)", what, step + 1, n_steps, loss.item(),
                     time.perf_counter() - t0)
    tower.eval()


@torch.inference_mode()
def _accuracy(embs: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> float:
    return float(((embs @ targets.T).argmax(-1) == labels).float().mean())


# -- images -------------------------------------------------------------------------

def digit_png(pixels: torch.Tensor, size: int = 64) -> bytes:
    """(3, S, S) in [0, 1] -> PNG bytes at size x size: how a user would send a digit."""
    arr = (pixels.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    img = Image.fromarray(arr, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def train_image(cfg: TrainConfig, text_targets: torch.Tensor,
                img_cfg: ImageConfig) -> tuple[PatchTower, dict]:
    x, y = ds.digits(img_cfg.image_size)
    train, test = ds.split_indices(y, cfg.held_out_images, cfg.seed)
    if cfg.tiny:
        train = train[:256]
    tower = PatchTower(image_tower_config(img_cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, len(train) // cfg.image_batch)
    order: list[int] = []

    def batches(step: int):
        nonlocal order
        if step % steps_per_epoch == 0:
            order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
        idx = order[(step % steps_per_epoch) * cfg.image_batch:][:cfg.image_batch]
        pix = ds.augment_images(x[idx], gen)
        B = len(idx)
        return (pixels_to_patches(pix, img_cfg).reshape(B * img_cfg.n_patches, -1),
                [img_cfg.n_patches] * B, y[idx])

    _fit(tower, batches, steps_per_epoch * cfg.image_epochs, cfg, text_targets, "image")
    # Held-out evaluation through the real front end: PNG bytes -> decode -> patches.
    with torch.inference_mode():
        patches = [image_to_patches(decode_image(digit_png(x[i]), img_cfg), img_cfg)
                   for i in test]
        embs = tower(torch.cat(patches), [p.shape[0] for p in patches])
    acc = _accuracy(embs, y[test], text_targets)
    # Cross-modal retrieval: for each digit word, the share of its top-10 images
    # (among all held-out images) that show that digit.
    sims = embs @ text_targets.T  # (n_test, 10)
    p10 = sum(float((y[test][sims[:, c].topk(10).indices] == c).float().mean())
              for c in range(10)) / 10
    return tower, {"held_out_images": len(test), "zero_shot_top1": round(acc, 4),
                   "text_to_image_precision_at_10": round(p10, 4)}


# -- audio --------------------------------------------------------------------------

def train_audio(cfg: TrainConfig, text_targets: torch.Tensor,
                aud_cfg: AudioConfig) -> tuple[PatchTower, dict]:
    accents = ds.ACCENTS[:2] if cfg.tiny else ds.ACCENTS
    train_vars = ds.TRAIN_VARIANTS[:3] if cfg.tiny else ds.TRAIN_VARIANTS
    test_vars = ds.HELD_OUT_VARIANTS[:2] if cfg.tiny else ds.HELD_OUT_VARIANTS
    t0 = time.perf_counter()
    train_clips = ds.speech_clips(train_vars, cfg.clips_per_voice, cfg.seed, accents)
    test_clips = ds.speech_clips(test_vars, 1, cfg.seed + 1, accents)
    log.info("synthesised %d training and %d held-out clips in %.0f s", len(train_clips),
             len(test_clips), time.perf_counter() - t0)
    waves = [decode_audio(c.wav, aud_cfg) for c in train_clips]
    labels = torch.tensor([c.word for c in train_clips])
    mel = LogMel(aud_cfg)
    tower = PatchTower(audio_tower_config(aud_cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, len(waves) // cfg.audio_batch)
    order: list[int] = []

    def batches(step: int):
        nonlocal order
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(waves), generator=gen).tolist()
        idx = order[(step % steps_per_epoch) * cfg.audio_batch:][:cfg.audio_batch]
        patches = []
        for i in idx:
            w = ds.augment_wave(waves[i], aud_cfg.sample_rate, gen)[
                :int(aud_cfg.max_seconds * aud_cfg.sample_rate)]
            patches.append(frames_to_patches(ds.spec_augment(mel(w), gen), aud_cfg))
        return torch.cat(patches), [p.shape[0] for p in patches], labels[idx]

    _fit(tower, batches, steps_per_epoch * cfg.audio_epochs, cfg, text_targets, "audio")
    with torch.inference_mode():
        patches = [frames_to_patches(mel(decode_audio(c.wav, aud_cfg)), aud_cfg)
                   for c in test_clips]
        embs = torch.cat([tower(torch.cat(patches[i:i + 128]),
                                [p.shape[0] for p in patches[i:i + 128]])
                          for i in range(0, len(patches), 128)])
    test_labels = torch.tensor([c.word for c in test_clips])
    acc = _accuracy(embs, test_labels, text_targets)
    digits_only = test_labels < len(ds.DIGIT_WORDS)
    return tower, {
        "training_clips": len(train_clips), "held_out_clips": len(test_clips),
        "held_out_variants": test_vars, "accents": accents,
        "zero_shot_top1": round(acc, 4),
        "zero_shot_top1_digits": round(_accuracy(
            embs[digits_only], test_labels[digits_only], text_targets[:10]), 4),
    }


def train_default(cfg: TrainConfig, text_model) -> TowersCheckpoint:
    """Train both towers against ``text_model`` (a MultimodalModel); return the checkpoint."""
    ds.seed_everything(cfg.seed)
    torch.set_num_threads(torch.get_num_threads())
    img_cfg, aud_cfg = ImageConfig(), AudioConfig()
    t0 = time.perf_counter()
    image, img_eval = train_image(cfg, text_model.embed("text", ds.DIGIT_WORDS), img_cfg)
    log.info("image tower: %s (%.0f s)", img_eval, time.perf_counter() - t0)
    audio, aud_eval = train_audio(cfg, text_model.embed("text", ds.AUDIO_WORDS), aud_cfg)
    meta = {
        "text_model": text_model.version,
        "train_config": cfg.__dict__,
        "image_labels": ds.DIGIT_WORDS, "audio_labels": ds.AUDIO_WORDS,
        "image_eval": img_eval, "audio_eval": aud_eval,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "data": "sklearn load_digits (held-out 30%); espeak-ng speech, held-out voice variants",
    }
    return TowersCheckpoint(img_cfg, aud_cfg, image, audio, meta)
