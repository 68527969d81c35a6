"""Audio input: the checks and decoding of audio that producers run before they enqueue
a job and that the model's audio front end (core/model/audio.py) starts from; no torch.

Audio is read with soundfile (libsndfile), ``AUDIO_FORMATS`` only: its sample rate and
length checked from the header first, its container's own sizes checked against the
bytes that arrived (core/audio_headers.py), then decoded a block at a time and
downmixed to mono. Anything refused is an ``InvalidInput`` saying why.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from core.audio_headers import check_whole_aiff, check_whole_ogg, mp3_length_declared, whole_wav
from core.errors import InvalidInput, check_payload_size

UNSUPPORTED = InvalidInput.UNSUPPORTED  # undecodable bytes: HTTP 415

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
    # MP3 and Ogg (Vorbis, Opus) decode to floats, which a loud master overshoots by a dB
    # or two. An MP3 has no checksum, so damage reaches its decoder: bytes changed in the
    # middle decoded to samples of 30, 2000 or 50000 (deterministic, not float PCM
    # mistaken for integers): past 12 dB over full scale such a file is called damaged.
    max_lossy_peak: float = 4.0


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
    data = whole_wav(data, index)
    check_whole_aiff(data, index)
    check_whole_ogg(data, index)
    try:
        info = sf.info(_AudioBytes(data))
        if info.format not in AUDIO_FORMATS:
            raise InvalidInput(f"{info.format} audio is not accepted; accepted: "
                               f"{AUDIO_FORMATS_TEXT}", index=index, kind=UNSUPPORTED)
        _check_rate(info.samplerate, cfg, index)
        known = info.frames != _UNKNOWN_LENGTH
        # Refuse long clips from the header, before decoding them into memory.
        if known and info.frames / max(info.samplerate, 1) > cfg.max_seconds:
            raise InvalidInput(f"audio is {info.frames / info.samplerate:.1f} s long, over "
                               f"the limit of {cfg.max_seconds:g} s", index=index,
                               kind=InvalidInput.TOO_LARGE)
        limit = int(cfg.max_seconds * info.samplerate)
        wave = _read_mono(data, info.channels, limit)
        if wave.size > limit:  # only where the header gives no length
            raise InvalidInput(f"audio is longer than the limit of {cfg.max_seconds:g} s "
                               "(its header gives no length: decoding stopped there)",
                               index=index, kind=InvalidInput.TOO_LARGE)
    except InvalidInput:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise InvalidInput(_undecodable(data, e), index=index,
                           kind=InvalidInput.UNSUPPORTED) from None
    if known:
        _check_whole(data, wave, info.format, info.frames, info.samplerate, index)
    if info.format in _LOSSY and wave.size:
        _check_lossy(wave, info.format, cfg, index)
    return wave, int(info.samplerate)


def _check_whole(data: bytes, wave: np.ndarray, fmt: str, frames: int, rate: int,
                 index: int | None) -> None:
    """``InvalidInput`` when fewer frames decode than the length libsndfile read from the
    file: an MP3 cut short or with frames missing (libmpg123 stops early, and libsndfile
    says nothing), an Ogg Vorbis page whose checksum fails (skipped: 5 s of 20 gone).
    Only where that length is the writer's: an MP3's is a guess without a Xing header.
    As for a WAV, a frame and 10 ms may be missing."""
    if fmt == "MP3" and not mp3_length_declared(data):
        return
    if frames - wave.size >= max(1, rate // 100):
        raise InvalidInput(f"the {fmt} file declares {frames / rate:.2f} s of "
                           f"audio but only {wave.size / rate:.2f} s decode: it was cut "
                           "short or is damaged", index=index, kind=UNSUPPORTED)


# Formats decoded to floats by a lossy decoder, whose samples only damage takes far past
# full scale. Not WAV or AIFF: a float file there is checked against max_peak, with the
# hint that fits it (integer PCM values given as floats).
_LOSSY = ("MP3", "OGG")


def _check_lossy(wave: np.ndarray, fmt: str, cfg: AudioConfig, index: int | None) -> None:
    if not np.isfinite(wave).all():
        reach = "NaN or infinite samples"
    elif (peak := float(np.abs(wave).max())) > cfg.max_lossy_peak:
        reach = f"samples reaching {peak:.3g}, far past full scale (1.0)"
    else:
        return
    raise InvalidInput(f"the {fmt} file is damaged: it decodes to {reach}", index=index,
                       kind=UNSUPPORTED)


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


# libsndfile's length when the file gives none (SF_COUNT_MAX): a FLAC written to a pipe
# (STREAMINFO's total samples 0, as ffmpeg leaves it), an MP3 whose length mpg123 cannot
# tell. Such a file is decoded to its end, as far as the limit: it was refused as
# "576460752303423.5 s long".
_UNKNOWN_LENGTH = 2**63 - 1


class _Forward(sf.SoundFile):
    """A SoundFile whose reads never seek. soundfile seeks to where each read ended,
    when seekable() says it can, and libFLAC answers a seek by searching the stream for
    that sample: at the end of a FLAC of unknown length there is none ("Internal
    psf_fseek() failed"), and the file was refused. A read carries on where the last
    one ended without it (a 290 s FLAC: 98 -> 83 ms)."""

    def seekable(self) -> bool:
        return False


def _read_mono(data: bytes, channels: int, limit: int) -> np.ndarray:
    """The file's samples downmixed to mono (samples,) float32, decoded a block at a time:
    read whole, every channel was in memory at once before the downmix (a 474 KB FLAC of
    8 channels at 192 kHz took an API process to 2.2 GB; a 255-channel Ogg would need
    ~15 GB), where the mono result is at most max_seconds x max_sample_rate samples.
    Decoding stops once past ``limit`` frames (a file of unknown length; the caller
    refuses it): memory holds the limit and a block, whatever the file's length."""
    frames = max(1, (1 << 20) // max(channels, 1))  # ~4 MB of float32 per block
    parts, total = [], 0
    with _Forward(_AudioBytes(data)) as f:
        while total <= limit and (want := min(frames, f.frames - total)) > 0:
            # Only the frames read() returns: fewer than asked at the end, and where a
            # damaged file stops decoding early (an MP3 with bytes cut or changed, short of
            # the length its header gives). soundfile's blocks() yielded its whole buffer
            # even then, np.empty's memory past the frames decoded: NaN, 1e19 or old
            # samples, whatever the heap held, so one file was refused or accepted by turns.
            # Never past the length the file gives, as soundfile's own reads stop: mpg123
            # asked for more reads on into what follows an MP3's audio (junk, a tag) and
            # fails there ("Unspecified internal error").
            block = f.read(want, dtype="float32", always_2d=True)
            if len(block):
                parts.append(block.mean(axis=1, dtype=np.float32))
                total += len(block)
            if len(block) < want:
                break
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def reads_as_audio(data: bytes) -> bool:
    """Whether libsndfile reads these bytes' header (any format it knows): how
    ``core.inputs.media_kind`` tells audio from neither."""
    try:
        sf.info(_AudioBytes(data))
        return True
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return False


def _check_rate(rate: int, cfg: AudioConfig, index: int | None) -> int:
    if not cfg.min_sample_rate <= rate <= cfg.max_sample_rate:
        raise InvalidInput(f"sample rate {rate} Hz is outside {cfg.min_sample_rate}.."
                           f"{cfg.max_sample_rate} Hz", index=index)
    return rate
