"""Input checks and decoding that need no torch: what a producer validates before it
enqueues a job (the API process never imports torch), and what the model's front
ends (core/model/image.py, audio.py, text.py) start from.

Images are decoded defensively: the pixel count is checked from the header before
any pixel is decoded (a decompression bomb never reaches memory), truncated files
(every pixel decoded, and for PNG and GIF the file's end checked too) and unknown
formats become ``InvalidInput``, EXIF orientation is applied, and every
mode Pillow reads (L, LA, RGB, RGBA, P, CMYK, I;16, ...) ends as RGB. Audio is
read with soundfile (``AUDIO_FORMATS`` only), its length and sample rate checked
from the header first.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps, UnidentifiedImageError

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


# -- audio --------------------------------------------------------------------------------

# Audio containers accepted (libsndfile's names: soundfile.info().format), and how the
# docs (docs/model.md) and errors name them. libsndfile reads two dozen more (AU, CAF,
# VOC, PAF, ...): refused, so that what is accepted is what is documented, and rarely used
# parsers never see untrusted bytes. WAVEX is WAV with the extensible header.
AUDIO_FORMATS = ("WAV", "WAVEX", "FLAC", "OGG", "MP3", "AIFF")
AUDIO_FORMATS_TEXT = "WAV, FLAC, OGG Vorbis or Opus, MP3, AIFF"


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16_000
    # Longer clips are refused: the speech tower transcribes 30 s windows one after
    # another, ten at most (core/model/whisper/tower.py SpeechConfig.max_seconds).
    max_seconds: float = 300.0
    max_bytes: int = 50 * 1024 * 1024
    # Sample rates accepted (Hz): telephone speech to studio masters. A header can
    # claim anything: 2 GHz passed the duration check (few samples per "second")
    # and then failed in the worker's resampler with a raw torch error.
    min_sample_rate: int = 8_000
    max_sample_rate: int = 192_000
    # Samples are [-1, 1] at full scale; a float file may go over (clipped masters), not
    # 40 dB over. Samples near 1e19 overflowed the log-mel's float32 power to inf: the
    # job "succeeded" with NaN label scores on SQLite (and invalid JSON in its webhook)
    # and failed with a page of SQL on PostgreSQL.
    max_peak: float = 100.0


def read_audio(data: object, cfg: AudioConfig,
               index: int | None = None) -> tuple[np.ndarray, int]:
    """Audio bytes or (waveform, sample_rate) -> (mono float32 (samples,), its rate), or
    ``InvalidInput`` saying why. Not resampled: the model's front end does that."""
    if isinstance(data, tuple) and len(data) == 2:
        wave, rate = data
        try:
            wave = np.asarray(wave, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"waveform is not numeric: {e}", index=index) from None
        if wave.ndim == 2:  # (channels, samples) or (samples, channels): the short side
            wave = wave.mean(axis=0 if wave.shape[0] <= wave.shape[1] else 1)
        if wave.ndim != 1:
            raise InvalidInput(f"waveform must be 1-D or 2-D, got shape {tuple(wave.shape)}",
                               index=index)
        if not isinstance(rate, int | np.integer) or isinstance(rate, bool):
            raise InvalidInput(f"sample rate must be an integer, got {rate!r}", index=index)
        rate = _check_rate(int(rate), cfg, index)
    elif isinstance(data, bytes | bytearray | memoryview):
        wave, rate = _decode_bytes(bytes(data), cfg, index)
    else:
        raise InvalidInput(f"audio must be bytes or (waveform, sample_rate), got "
                           f"{type(data).__name__}", index=index)
    if wave.size == 0:
        raise InvalidInput("audio has no samples (zero length)", index=index)
    if wave.size / rate > cfg.max_seconds:
        raise InvalidInput(f"audio is {wave.size / rate:.1f} s long, over the limit of "
                           f"{cfg.max_seconds:g} s", index=index, kind=InvalidInput.TOO_LARGE)
    if not np.isfinite(wave).all():
        raise InvalidInput("audio contains NaN or infinite samples", index=index)
    peak = float(np.abs(wave).max())
    if peak > cfg.max_peak:
        raise InvalidInput(f"audio samples reach {peak:.3g}: float audio is expected within "
                           f"[-1, 1], and samples past +-{cfg.max_peak:g} are refused "
                           "(integer PCM values given as floats?)", index=index)
    return np.ascontiguousarray(wave, dtype=np.float32), rate


def _decode_bytes(data: bytes, cfg: AudioConfig, index: int | None) -> tuple[np.ndarray, int]:
    check_payload_size(data, cfg.max_bytes, "audio", index)
    data = _whole_wav(data, index)
    try:
        info = sf.info(_AudioBytes(data))
        if info.format not in AUDIO_FORMATS:
            raise InvalidInput(f"{info.format} audio is not accepted; accepted: "
                               f"{AUDIO_FORMATS_TEXT}", index=index, kind=UNSUPPORTED)
        _check_rate(info.samplerate, cfg, index)
        # Refuse long clips from the header, before decoding them into memory.
        if info.frames / max(info.samplerate, 1) > cfg.max_seconds:
            raise InvalidInput(f"audio is {info.frames / info.samplerate:.1f} s long, over "
                               f"the limit of {cfg.max_seconds:g} s", index=index,
                               kind=InvalidInput.TOO_LARGE)
        wave = _read_mono(data, info.channels)
    except InvalidInput:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise InvalidInput(_undecodable(data, e), index=index,
                           kind=InvalidInput.UNSUPPORTED) from None
    return wave, int(info.samplerate)


# A WAV's data size when its writer could not seek back to fill it in (streaming to a
# pipe): ffmpeg leaves 0xFFFFFFFF, SoX 0x7FFFF000, GStreamer 0x7FFF0000, arecord
# 0x7FFFFFFF or so, and a recorder stopped before it closed the file, 0. The audio runs
# to the file's end. No WAV accepted here comes near 2 GB (AudioConfig.max_bytes).
_WAV_UNKNOWN = 0x7FFF0000
_WAV_CHUNKS = 100  # looked at before "data" (fmt, fact, LIST, bext, JUNK, ...); then
# libsndfile decides: a file of empty chunks would loop here a million times


def _whole_wav(data: bytes, index: int | None) -> bytes:
    """A WAV's bytes as libsndfile should read them, or ``InvalidInput`` when its header
    declares more audio than the file holds: an upload cut short, which libsndfile
    decodes as far as it goes (its log's "should be" is all it says) and which was
    transcribed as if whole. A data size of 0 followed by audio that the RIFF size
    does not count either is a stream's placeholder: set, in a copy, to what the file
    holds (libsndfile reads it as no audio). Anything else (not a WAV, a malformed
    chunk, no data chunk) is left to libsndfile."""
    if data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return data
    end = "<" if data[:4] == b"RIFF" else ">"  # RIFX: the same, big-endian
    pos, byte_rate, block = 12, 0, 0
    for _ in range(_WAV_CHUNKS):
        if pos + 8 > len(data):
            break
        tag, size = data[pos:pos + 4], struct.unpack_from(end + "I", data, pos + 4)[0]
        body, held = pos + 8, len(data) - pos - 8
        if tag == b"fmt " and size >= 16 and held >= 16:
            _, _, rate, byte_rate, block = struct.unpack_from(end + "HHIIH", data, body)
            byte_rate = byte_rate or rate * block  # libsndfile reads no byte rate
        elif tag == b"data":
            riff = struct.unpack_from(end + "I", data, 4)[0]
            if size == 0 and held and (riff >= _WAV_UNKNOWN or riff + 8 <= body):
                fixed = bytearray(data)
                struct.pack_into(end + "I", fixed, pos + 4, held - held % max(block, 1))
                return bytes(fixed)
            # A last frame or pad byte short (writers that count one) loses no audio:
            # refused from a whole frame and 10 ms missing.
            if (size < _WAV_UNKNOWN and byte_rate
                    and size - held >= max(block, byte_rate // 100, 1)):
                raise InvalidInput(f"the WAV header declares {size / byte_rate:.2f} s of "
                                   f"audio but the file holds {held / byte_rate:.2f} s: "
                                   "it was cut short", index=index, kind=UNSUPPORTED)
            break
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return data


# An accepted container's first bytes -> its name; MP3 without an ID3 tag starts with a
# frame sync (11 bits set), checked apart. Only to say what a refused file looked like.
_SIGNATURES = ((b"RIFF", 8, b"WAVE", "a WAV"), (b"fLaC", 0, b"", "a FLAC"),
               (b"OggS", 0, b"", "an OGG"), (b"ID3", 0, b"", "an MP3"),
               (b"FORM", 8, b"AIF", "an AIFF"))
# soundfile names the file it opened by its repr: "Error opening <_io.BytesIO object at
# 0x7f...>: ..." for bytes read from memory, which told a client nothing.
_OBJECT_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-fA-F]+>")
# libsndfile's words for a seek that failed inside a damaged file (the in-memory file
# refused a negative offset): about a pipe or an internal call, not about the upload.
_SEEK_FAILED = ("not a regular file", "psf_fseek")


def _undecodable(data: bytes, e: Exception) -> str:
    """Why audio bytes were refused, for a person: the formats expected, what the
    bytes look like, and the decoder's own reason, with no Python object in it."""
    found = next((f"{name} file that could not be decoded" for head, at, tag, name
                  in _SIGNATURES if data.startswith(head) and data[at:at + len(tag)] == tag),
                 None)
    if found is None and len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        found = "an MP3 file that could not be decoded"
    said = e.error_string if isinstance(e, sf.LibsndfileError) else str(e)
    said = _OBJECT_REPR.sub("the file", said).strip().removeprefix("Error : ")
    if any(s in said for s in _SEEK_FAILED):
        said = "it is cut short or corrupt: a seek inside it failed"
    return (f"not a readable audio file: expected {AUDIO_FORMATS_TEXT}; found "
            f"{found or 'none of them'} ({said.rstrip('.')})")


class _AudioBytes(io.BytesIO):
    """Audio bytes as soundfile's virtual I/O reads them, with a seek that fails as
    lseek(2) does. libsndfile seeks before the start of some damaged files (an AIFF
    whose SSND chunk is missing: seek(-1)); io.BytesIO raised ValueError inside
    soundfile's cffi callback, so cffi printed "Exception ignored from cffi callback
    ... negative seek value -1" and a traceback to stderr (the worker's and the API's
    log) and told libsndfile the seek had landed at 0. Here the position stays and the
    callback, which answers the tell() after its seek(), answers -1: libsndfile sees a
    failed seek and refuses the file as it refuses one read from disk."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self._size, self._failed = len(data), False

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: super().tell(), io.SEEK_END: self._size}
        if start.get(whence, 0) + offset < 0:
            self._failed = True
            return -1
        return super().seek(offset, whence)

    def tell(self) -> int:
        if self._failed:  # the tell() that reports the seek just refused
            self._failed = False
            return -1
        return super().tell()


def _read_mono(data: bytes, channels: int) -> np.ndarray:
    """The file's samples downmixed to mono (samples,) float32, decoded a block at a time:
    read whole, every channel was in memory at once before the downmix (a 474 KB FLAC of
    8 channels at 192 kHz took an API process to 2.2 GB; a 255-channel Ogg would need
    ~15 GB), where the mono result is at most max_seconds x max_sample_rate samples."""
    frames = max(1, (1 << 20) // max(channels, 1))  # ~4 MB of float32 per block
    with sf.SoundFile(_AudioBytes(data)) as f:
        parts = [block.mean(axis=1, dtype=np.float32) for block in
                 f.blocks(blocksize=frames, dtype="float32", always_2d=True)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _check_rate(rate: int, cfg: AudioConfig, index: int | None) -> int:
    if not cfg.min_sample_rate <= rate <= cfg.max_sample_rate:
        raise InvalidInput(f"sample rate {rate} Hz is outside {cfg.min_sample_rate}.."
                           f"{cfg.max_sample_rate} Hz", index=index)
    return rate


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
    try:
        sf.info(_AudioBytes(data))
        return "audio"
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None


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
