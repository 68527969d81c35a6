"""Input checks and decoding that need no torch: what a producer validates before it
enqueues a job (the API process never imports torch), and what the model's front
ends (core/model/image.py, audio.py, text.py) start from.

Images are decoded defensively: the pixel count is checked from the header before
any pixel is decoded (a decompression bomb never reaches memory), truncated files
(every pixel decoded, and for PNG and GIF the file's end checked too) and unknown
formats become ``InvalidInput``, EXIF orientation is applied, and every
mode Pillow reads (L, LA, RGB, RGBA, P, CMYK, I;16, ...) ends as RGB. Audio is
read in core/audio_input.py (re-exported here: ``read_audio``, ``AudioConfig``, ...).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Audio lives in core/audio_input.py; producers and the model import it from here too.
from core.audio_input import (  # noqa: F401
    AUDIO_FORMATS,
    AUDIO_FORMATS_TEXT,
    AudioConfig,
    read_audio,
    reads_as_audio,
)
from core.errors import InvalidInput, check_payload_size
from core.params import nothing_visible

# -- text ---------------------------------------------------------------------------------

def validate_text(item: object, max_chars: int, index: int | None = None) -> str:
    """str or UTF-8 bytes -> the text (unstripped), or ``InvalidInput`` saying why.
    Shared by producers (before enqueue) and the model (before tokenising)."""
    if isinstance(item, bytes | bytearray):
        try:
            item = bytes(item).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"text is not valid UTF-8 ({e.reason} at byte {e.start})",
                               index=index) from None
    if not isinstance(item, str):
        raise InvalidInput(f"text must be a string, got {type(item).__name__}", index=index)
    try:
        item.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"text is not valid Unicode ({e.reason} at {e.start})",
                           index=index) from None
    if "\x00" in item:
        # Refused, not stripped: PostgreSQL text cannot hold NUL (the insert failed with
        # a 500), and a NUL in a text is a client's bug that silence would hide.
        raise InvalidInput(f"text contains a NUL character (at {item.index(chr(0))})",
                           index=index)
    if len(item) > max_chars:
        raise InvalidInput(f"text has {len(item)} characters, over the limit of "
                           f"{max_chars}", index=index, kind=InvalidInput.TOO_LARGE)
    if not item.strip():
        raise InvalidInput("text is empty or only whitespace", index=index)
    if (only := nothing_visible(item)) is not None:
        raise InvalidInput(f"text is empty: it has no visible characters, only {only}",
                           index=index)
    return item


# -- images -------------------------------------------------------------------------------

UNSUPPORTED = InvalidInput.UNSUPPORTED  # undecodable bytes: HTTP 415

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG's last chunk: empty, constant CRC


@dataclass(frozen=True)
class ImageConfig:
    # Square side after resize, and the network's total stride: (image_size /
    # patch_size)^2 is what an image costs in a batch's token budget. The ImageNet
    # front end (core/model/zeroshot.py FRONT_END) sets 224 / 32; decoding ignores them.
    image_size: int = 224
    patch_size: int = 32
    # Refused before decoding: Pillow's own bomb guard only warns below 2x its limit.
    max_pixels: int = 40_000_000
    max_bytes: int = 20 * 1024 * 1024
    mean: float = 0.5  # inputs are scaled to [0, 1] then (x - mean) / std, per channel
    std: float = 0.5
    # Shorter side before the centre crop to image_size (ImageNet's 256 -> 224 keeps the
    # border out, as the backbone was evaluated); None resizes straight to image_size.
    resize_size: int | None = None
    # A large JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling)
    # while its shorter side stays at least this many times the resize side, and only by
    # a factor that divides both sides (the resize then sees the same aspect ratio, and
    # picks the same size). A 4032x3024 photo: 81 -> 18 ms to decode and resize, its
    # pixels within 0.05 (of [-1, 1]) and its embedding at cosine >= 0.99998 of every
    # pixel decoded (bench/photos.py); line art and text drafted to just twice the
    # side move more (up to 0.3; cosine >= 0.998). Pillow's thumbnail() drafts with the
    # same gap of 2. A JPEG libjpeg cannot scale (lossless) is decoded whole; a caller's
    # PIL image is never drafted. None: every pixel decoded.
    draft_gap: float | None = 2.0

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


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


def _check_complete(data: bytes, fmt: str, index: int | None) -> None:
    """Pillow decodes a PNG that lacks its last bytes (IEND, the compressed stream's
    end and checksum) and a GIF that lacks its trailer without a word, so a file cut
    short in transit was classified. PNG: every chunk's CRC, up to IEND (no pixel is
    decompressed); GIF: the trailer byte, which also catches a cut in a later frame,
    which decoding the first frame never reads."""
    try:
        if fmt == "PNG":
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # stops at IEND's name, before its CRC: check it whole
            if PNG_END not in data:
                raise OSError("the PNG's IEND chunk is cut short")
        elif fmt == "GIF" and not data.endswith(b"\x3b"):
            raise OSError("the GIF ends without its trailer")
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise InvalidInput(f"image could not be decoded: it is truncated or corrupt ({e})",
                           index=index, kind=UNSUPPORTED) from None


def _draft(img: Image.Image, short_side: float) -> bool:
    """Have a JPEG not yet loaded decode at the largest of 1/8, 1/4, 1/2 that divides
    both its sides and keeps its shorter side >= ``short_side`` -> whether it will
    (else: every pixel). Every coefficient is still read, so a truncated or corrupt
    file fails as before."""
    w, h = img.size
    for k in (8, 4, 2):
        if min(w, h) // k >= short_side and w % k == 0 and h % k == 0:
            img.draft(None, (w // k, h // k))  # the mode stays; the size is exact
            return True
    return False


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
    if isinstance(data, bytes):
        _check_complete(data, img.format, index)
        # Only a file opened here: a caller's own image object is left as it was given.
        if img.format == "JPEG" and cfg.draft_gap and _draft(
                img, (cfg.resize_size or cfg.image_size) * cfg.draft_gap):
            try:
                return _load_rgb(img)
            except _DECODE_ERRORS:
                # libjpeg cannot scale every JPEG (a lossless one): what decodes
                # whole must still be accepted, so decode every pixel, as before.
                img = Image.open(io.BytesIO(data))
    try:
        return _load_rgb(img)
    except _DECODE_ERRORS as e:
        raise InvalidInput(f"image could not be decoded: {e}", index=index,
                           kind=UNSUPPORTED) from None


# struct.error: Pillow's parsers of binary headers and tags raise it on malformed fields.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error,
                  Image.DecompressionBombError)


def _load_rgb(img: Image.Image) -> Image.Image:
    img.seek(0)  # animated GIF/WebP/TIFF: the first frame
    try:
        img = ImageOps.exif_transpose(img)
    except (struct.error, TypeError, KeyError):  # not OSError: a pixel decoder's own
        # A malformed EXIF block (one byte of a tag's type changed: struct.error) is
        # metadata, not pixels: the photo decodes upright as stored. It was a 500 at the
        # API and a raw struct.error in the SDK.
        pass
    img.load()
    return _to_rgb(img)


# -- images or audio ---------------------------------------------------------------------

def media_kind(data: bytes) -> str | None:
    """"image" or "audio" by which decoder reads the header (never a file name); None
    when neither does. An image with too many pixels is still an image: its own check
    refuses it with TOO_LARGE."""
    try:
        Image.open(io.BytesIO(data))
        return "image"
    except Image.DecompressionBombError:
        return "image"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass
    return "audio" if reads_as_audio(data) else None


def sniff_modality(data: bytes, index: int | None = None, *, what: str = "") -> str:
    """"image" or "audio" by which decoder reads the header (``media_kind``); when
    neither does, ``InvalidInput`` of kind UNSUPPORTED (an HTTP 415) that names the
    formats. ``what`` prefixes the reason (e.g. "query: ")."""
    kind = media_kind(data)
    if kind is None:
        raise InvalidInput(f"{what}not an image or audio file this service decodes (images: "
                           f"PNG, JPEG, ...; audio: {AUDIO_FORMATS_TEXT})", index=index,
                           kind=InvalidInput.UNSUPPORTED)
    return kind
