"""The image front end: bytes or PIL images in, pixels (CNN) or patch tokens (ViT) out.

Decoding is defensive: the pixel count is checked from the header before any
pixel is decoded (a decompression bomb never reaches memory), truncated files
and unknown formats become ``InvalidInput``, EXIF orientation is applied, and
every mode Pillow reads (L, LA, RGB, RGBA, P, CMYK, I;16, ...) ends as RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import InvalidInput, check_payload_size

UNSUPPORTED = InvalidInput.UNSUPPORTED  # undecodable bytes: HTTP 415

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class ImageConfig:
    image_size: int = 32  # square side after resize; the digit towers need no more
    patch_size: int = 8  # (32 / 8)^2 = 16 patches + 1 class token = 17 tokens per image
    # Refused before decoding: Pillow's own bomb guard only warns below 2x its limit.
    max_pixels: int = 40_000_000
    max_bytes: int = 20 * 1024 * 1024
    mean: float = 0.5  # inputs are scaled to [0, 1] then (x - mean) / std, per channel
    std: float = 0.5
    # Shorter side before the centre crop to image_size (ImageNet's 256 -> 224 keeps the
    # border out, as the backbone was evaluated); None resizes straight to image_size.
    resize_size: int | None = None

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited over white (paper)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        img = Image.fromarray((a / (65535.0 if hi > 255 else max(hi, 1.0)) * 255).clip(
            0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("LA", "RGBA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def decode_image(data: object, cfg: ImageConfig, index: int | None = None) -> Image.Image:
    """bytes / bytearray / PIL.Image -> RGB PIL image, or ``InvalidInput`` saying why."""
    if isinstance(data, Image.Image):
        img = data
    elif isinstance(data, bytes | bytearray | memoryview):
        data = bytes(data)
        check_payload_size(data, cfg.max_bytes, "image", index)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise InvalidInput("not an image (no decoder recognises these bytes)",
                               index=index, kind=UNSUPPORTED) from None
        except Image.DecompressionBombError as e:  # Pillow's own header check, at 2x its limit
            raise InvalidInput(f"image pixel count is over the limit: {e}", index=index,
                               kind=InvalidInput.TOO_LARGE) from None
        except (OSError, SyntaxError, ValueError) as e:  # a known signature, then garbage
            raise InvalidInput(f"not an image, or a corrupt one ({e})", index=index,
                               kind=UNSUPPORTED) from None
        if img.format not in FORMATS:
            raise InvalidInput(f"unsupported image format {img.format}; accepted: "
                               f"{', '.join(FORMATS)}", index=index, kind=UNSUPPORTED)
    else:
        raise InvalidInput(f"image must be bytes or a PIL image, got {type(data).__name__}",
                           index=index)
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise InvalidInput(f"image is {w}x{h} = {w * h} pixels, over the limit of "
                           f"{cfg.max_pixels}", index=index, kind=InvalidInput.TOO_LARGE)
    if w == 0 or h == 0:
        raise InvalidInput("image has no pixels", index=index)
    try:
        img.seek(0)  # animated GIF/WebP/TIFF: the first frame
        img = ImageOps.exif_transpose(img)
        img.load()
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"image could not be decoded: {e}", index=index,
                           kind=UNSUPPORTED) from None


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
