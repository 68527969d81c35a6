"""The image front end: bytes or PIL images in, pixels (CNN) or patch tokens (ViT) out.

Decoding and its checks are torch-free, in core/inputs.py (producers use them too).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from core.inputs import FORMATS, UNSUPPORTED, ImageConfig, decode_image  # noqa: F401


def image_to_patches(img: Image.Image, cfg: ImageConfig) -> torch.Tensor:
    """RGB image -> (n_patches, 3*p*p) normalised patch vectors, row-major order."""
    # Shorter side to image_size, then a centre crop: no distortion of the content.
    img = ImageOps.fit(img, (cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # (H, W, 3)
    x = (x - cfg.mean) / cfg.std
    S, p = cfg.image_size, cfg.patch_size
    x = x.view(S // p, p, S // p, p, 3).permute(0, 2, 1, 3, 4)  # (gh, gw, p, p, 3)
    return x.reshape(cfg.n_patches, cfg.patch_dim)


def image_to_pixels(img: Image.Image, cfg: ImageConfig) -> torch.Tensor:
    """RGB image -> (3, S, S) normalised pixels: bicubic resize of the shorter side to
    ``resize_size``, centre crop to ``image_size`` (the EfficientNet preprocessing)."""
    S, R = cfg.image_size, cfg.resize_size or cfg.image_size
    w, h = img.size
    scale = R / min(w, h)
    img = img.resize((max(S, round(w * scale)), max(S, round(h * scale))),
                     Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - S) // 2, (h - S) // 2
    img = img.crop((left, top, left + S, top + S))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # (S, S, 3)
    return ((x - cfg.mean) / cfg.std).permute(2, 0, 1).contiguous()  # (3, S, S)


def pixels_to_patches(pixels: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """(B, 3, S, S) images in [0, 1] -> (B, n_patches, 3*p*p); for training batches."""
    B, C, S, _ = pixels.shape
    p = cfg.patch_size
    x = (pixels - cfg.mean) / cfg.std
    x = x.view(B, C, S // p, p, S // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(B, cfg.n_patches, cfg.patch_dim)
