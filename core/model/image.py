"""The image front end: bytes or PIL images in, normalised pixels for the CNN out.

Decoding and its checks are torch-free, in core/inputs.py (producers use them too).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.inputs import FORMATS, UNSUPPORTED, ImageConfig, decode_image  # noqa: F401

# The most pixels along the longer side that the resize may produce: (ImageConfig's 40 M
# pixels may be one row of them). Past it, only the square the crop keeps is resized.
MAX_RESIZED_SIDE = 4096


def image_to_pixels(img: Image.Image, cfg: ImageConfig) -> torch.Tensor:
    """RGB image -> (3, S, S) normalised pixels: bicubic resize of the shorter side to
    ``resize_size``, centre crop to ``image_size`` (the EfficientNet preprocessing).

    A very long image (its resized longer side over ``MAX_RESIZED_SIDE``: an aspect ratio
    past ~18:1) is resized only where its centre crop comes from (Pillow's ``box``): a
    1 x 40,000 pixel PNG of 109 bytes was resized whole to 224 x 8,960,000 (11 GB in the
    model process, 48 s). That path is not bit-identical to resize-then-crop (pixels a
    level or more apart), so images of ordinary shapes keep the plain one."""
    S, R = cfg.image_size, cfg.resize_size or cfg.image_size
    w, h = img.size
    scale = R / min(w, h)
    W, H = max(S, round(w * scale)), max(S, round(h * scale))  # the resized size
    left, top = (W - S) // 2, (H - S) // 2
    if max(W, H) > MAX_RESIZED_SIDE:
        sx, sy = w / W, h / H  # source pixels per resized pixel
        img = img.resize((S, S), Image.Resampling.BICUBIC,
                         box=(left * sx, top * sy, (left + S) * sx, (top + S) * sy))
    else:
        img = img.resize((W, H), Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + S, top + S))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # (S, S, 3)
    return ((x - cfg.mean) / cfg.std).permute(2, 0, 1).contiguous()  # (3, S, S)
