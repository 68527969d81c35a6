"""Image front end: formats, modes, orientation, limits and clear errors."""

import io

import numpy as np
import pytest
from PIL import Image

from core.errors import InvalidInput
from core.model.image import ImageConfig, decode_image

CFG = ImageConfig()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sample(mode: str = "RGB", size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_rgb(fmt):
    img = decode_image(encode(sample(), fmt), CFG)
    assert img.mode == "RGB" and img.size == (40, 30)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16"])
def test_modes_convert_to_rgb(mode):
    src = sample(mode if mode != "I;16" else "L")
    if mode == "I;16":
        arr = (np.asarray(src, dtype=np.uint16) * 257)
        src = Image.fromarray(arr)
        assert src.mode.startswith("I;16")
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    img = decode_image(encode(src, fmt), CFG)
    assert img.mode == "RGB"
    if mode == "I;16":  # 16-bit range is scaled to 8 bits, not clipped to white
        assert 20 < np.asarray(img).mean() < 235


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = decode_image(encode(img, "PNG"), CFG)
    assert np.asarray(out).min() == 255


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue(), CFG))
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (10, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif), CFG)
    assert out.size == (20, 40)


def bad_exif(fmt: str) -> bytes:
    """An image whose EXIF block names, after its orientation, a tag Pillow cannot unpack
    (the make tag's id 0x010F changed to 0x0142: a hostile-user review's file)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "cam"
    raw = bytearray(exif.tobytes())
    big = b"MM" in raw[:8]  # the TIFF header's byte order (after "Exif\0\0", if any)
    at = raw.index(b"\x01\x0f" if big else b"\x0f\x01")
    raw[at + (1 if big else 0)] = 0x42
    return encode(Image.new("RGB", (40, 30)), fmt, exif=bytes(raw))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_malformed_exif_block_is_ignored_not_a_crash(fmt):
    """struct.error from the EXIF parser escaped decode_image (a 500 at the API, a raw
    struct.error in the SDK, a traceback in the CLI): the pixels decode as stored."""
    out = decode_image(bad_exif(fmt), CFG)
    assert out.size == (40, 30) and out.mode == "RGB"


def test_a_very_long_image_is_resized_only_where_its_crop_comes_from(monkeypatch):
    """A 1 x 40,000 PNG (235 bytes) was resized whole to 224 x 8,960,000 pixels (11 GB in
    the image model process): no resize may produce more than MAX_RESIZED_SIDE along a
    side, and the crop keeps the image's middle."""
    from core.model import image

    asked = []
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, size, *a, **k: asked.append(size) or real(self, size, *a, **k))
    tall = np.zeros((40_000, 1, 3), np.uint8)
    tall[19_000:21_000] = 255  # a white band in the middle; black elsewhere
    for cfg in (CFG, ImageConfig(resize_size=256)):
        x = image.image_to_pixels(decode_image(encode(Image.fromarray(tall), "PNG"), CFG), cfg)
        assert x.shape == (3, 224, 224)
        assert (x == 1.0).all()  # all white: the crop's rows come from the band
    assert max(max(size) for size in asked) <= image.MAX_RESIZED_SIDE
    wide = sample(size=(1000, 200))  # ordinary shapes keep resize-then-crop
    asked.clear()
    image.image_to_pixels(wide, CFG)
    assert asked == [(1120, 224)]


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"definitely not an image", "not an image"),
    (b"\x89PNG\r\n\x1a\n garbage", "not an image, or a corrupt one"),
    ("a string", "must be bytes"),
    (12, "must be bytes"),
])
def test_bad_inputs(data, reason):
    with pytest.raises(InvalidInput, match=reason):
        decode_image(data, CFG)


def test_truncated_file():
    data = encode(sample(size=(200, 200)), "PNG")
    with pytest.raises(InvalidInput, match="could not be decoded"):
        decode_image(data[: len(data) // 2], CFG)


def _photo(fmt: str, size=(200, 150)) -> bytes:
    x = np.linspace(0, 255, size[0])[None, :, None] + np.random.default_rng(1).normal(
        0, 20, (size[1], size[0], 3))
    return encode(Image.fromarray(x.clip(0, 255).astype(np.uint8)), fmt)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
@pytest.mark.parametrize("cut", [1, 2, 12, 16, 20, 22, 100, "half"])
def test_an_image_cut_short_is_refused(fmt, cut):
    """A PNG without its last chunks (IEND, even the end of its compressed pixels) and
    a GIF without its trailer decoded without a word, and were classified."""
    data = _photo(fmt)
    n = len(data) // 2 if cut == "half" else len(data) - cut
    with pytest.raises(InvalidInput) as e:
        decode_image(data[:n], CFG)
    assert e.value.kind == InvalidInput.UNSUPPORTED
    assert decode_image(data, CFG).size == (200, 150)  # whole, it is fine


def test_pillow_never_loads_truncated_images_in_a_worker():
    """LOAD_TRUNCATED_IMAGES (a process-wide switch some libraries turn on) makes Pillow
    fill a cut-off image with grey; nothing a worker imports may turn it on."""
    from PIL import ImageFile

    import core.model.multimodal  # noqa: F401
    import workers.app  # noqa: F401
    import workers.tasks  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_refused_before_decoding():
    # A 1-bit PNG of 20000 x 20000 is tiny on disk and 400 M pixels in memory.
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(InvalidInput, match="over the limit"):
        decode_image(bomb, CFG)


def test_the_pixel_limit_is_checked_below_pillows_own_guard():
    """40 M pixels is mmq's limit; Pillow itself refuses only above ~179 M (2x its
    89 M warning). 8000 x 8000 = 64 M pixels decodes if mmq's check is removed."""
    big = encode(Image.new("L", (8000, 8000)), "PNG")  # uniform: ~60 kB of bytes
    assert len(big) < 200_000 and 8000 * 8000 < Image.MAX_IMAGE_PIXELS
    with pytest.raises(InvalidInput, match="8000x8000 = 64000000 pixels, over the limit "
                                           "of 40000000") as e:
        decode_image(big, CFG)
    assert e.value.kind == InvalidInput.TOO_LARGE


def test_oversized_payload():
    with pytest.raises(InvalidInput, match="bytes, over the limit"):
        decode_image(b"\0" * (CFG.max_bytes + 1), CFG)



def test_a_large_jpeg_decodes_at_a_scale_that_keeps_twice_the_resize_side():
    """A 2048x1536 JPEG (resize side 224, gap 2: shorter side >= 448) decodes at 1/2,
    not 1/4 (384 < 448); the pixels the model sees stay within 0.05 of decoding every
    pixel. Sides that 2 does not divide decode whole (the aspect ratio would move)."""
    from dataclasses import replace

    from core.model.image import image_to_pixels

    data = _photo("JPEG", size=(2048, 1536))
    assert decode_image(data, CFG).size == (1024, 768)
    full = replace(CFG, draft_gap=None)
    assert decode_image(data, full).size == (2048, 1536)
    diff = image_to_pixels(decode_image(data, CFG), CFG) - image_to_pixels(
        decode_image(data, full), full)
    assert diff.abs().max().item() < 0.05
    assert decode_image(_photo("JPEG", size=(2047, 1536)), CFG).size == (2047, 1536)


def test_a_large_jpeg_cut_short_or_rotated_as_before():
    """Drafting still reads every coefficient (a cut file is refused) and EXIF
    orientation still turns the reduced image."""
    data = _photo("JPEG", size=(2048, 1536))
    with pytest.raises(InvalidInput):
        decode_image(data[: len(data) // 2], CFG)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img = Image.open(io.BytesIO(data))
    rotated = encode(img, "JPEG", exif=exif, quality=95)
    assert decode_image(rotated, CFG).size == (768, 1024)


def _lossless_jpeg(a: np.ndarray) -> bytes:
    """A lossless JPEG (SOF3, predictor 1, 8-bit grey, one Huffman table of the 17
    difference categories, each a 5-bit code): what some scanners and medical and
    ffmpeg's ljpeg write, and what libjpeg cannot decode at a reduced scale."""
    a = a.astype(np.int32)
    h, w = a.shape
    pred = np.empty_like(a)
    pred[0, 0] = 128
    pred[0, 1:], pred[1:, 0], pred[1:, 1:] = a[0, :-1], a[:-1, 0], a[1:, :-1]
    d = (a - pred).ravel()
    size = np.zeros_like(d)
    size[d != 0] = np.floor(np.log2(np.abs(d[d != 0]))).astype(np.int32) + 1
    extra = np.where(d >= 0, d, d + (1 << size) - 1) & ((1 << size) - 1)
    code, n = (size.astype(np.int64) << size) | extra, 5 + size
    k = np.arange(21)
    bits = ((code[:, None] >> np.maximum(n[:, None] - 1 - k, 0)) & 1)[k < n[:, None]]
    bits = np.concatenate([bits.astype(np.uint8), np.ones((-len(bits)) % 8, np.uint8)])

    def seg(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    return (b"\xff\xd8"
            + seg(0xC3, bytes([8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big")
                  + b"\x01\x01\x11\x00")
            + seg(0xC4, b"\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17)))
            + seg(0xDA, b"\x01\x01\x00\x01\x00\x00")
            + np.packbits(bits).tobytes().replace(b"\xff", b"\xff\x00") + b"\xff\xd9")


def test_a_large_lossless_jpeg_still_decodes():
    """libjpeg cannot scale a lossless JPEG: drafted, it failed ("broken data stream")
    and a file that decoded whole was refused; now it is decoded whole, as before."""
    a = np.random.default_rng(0).integers(0, 256, (1024, 1024))
    img = decode_image(_lossless_jpeg(a), CFG)
    assert img.size == (1024, 1024)
    assert np.array_equal(np.asarray(img)[..., 0], a)  # lossless: every value back


def test_a_callers_image_object_is_not_shrunk():
    """Only a file opened from bytes is drafted: an unloaded JPEG image object the
    caller passes in keeps its size (it was left at 1/2)."""
    img = Image.open(io.BytesIO(_photo("JPEG", size=(2048, 1536))))
    assert decode_image(img, CFG).size == (2048, 1536)
    assert img.size == (2048, 1536)
