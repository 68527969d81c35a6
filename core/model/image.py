"""The image front end: bytes or PIL images in, normalised pixels for the CNN out.

Decoding and its checks are torch-free, in core/inputs.py (producers use them too).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.inputs import FORMATS, UNSUPPORTED, ImageConfig, decode_image  # noqa: F401


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

