"""Audio containers' own sizes against the bytes that arrived, read with struct before
libsndfile sees the bytes: libsndfile decodes a file cut short as far as it goes, and
says so only in its log. Anything these walks do not recognise is left to libsndfile.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

from core.errors import InvalidInput

UNSUPPORTED = InvalidInput.UNSUPPORTED  # undecodable bytes: HTTP 415


# A WAV's data size when its writer could not seek back to fill it in (streaming to a
# pipe): ffmpeg leaves 0xFFFFFFFF, SoX 0x7FFFF000, GStreamer 0x7FFF0000, arecord
# 0x7FFFFFFF or so, and a recorder stopped before it closed the file, 0. The audio runs
# to the file's end. No WAV accepted here comes near 2 GB (AudioConfig.max_bytes).
_WAV_UNKNOWN = 0x7FFF0000
_WAV_CHUNKS = 100  # looked at before "data" (fmt, fact, LIST, bext, JUNK, ...; an AIFF's
# before SSND); then libsndfile decides: a file of empty chunks would loop here a
# million times


def _chunks(data: bytes, end: str) -> Iterator[tuple[int, bytes, int]]:
    """A RIFF or IFF file's chunks after its 12-byte header: (offset, tag, declared
    size), in ``end``'s byte order, the first ``_WAV_CHUNKS`` whose header arrived."""
    pos = 12
    for _ in range(_WAV_CHUNKS):
        if pos + 8 > len(data):
            return
        size = struct.unpack_from(end + "I", data, pos + 4)[0]
        yield pos, data[pos:pos + 4], size
        pos += 8 + size + (size & 1)  # chunks are padded to an even length


def whole_wav(data: bytes, index: int | None) -> bytes:
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
    byte_rate, block = 0, 0
    for pos, tag, size in _chunks(data, end):
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
    return data


# An AIFF's SSND size when its writer could not seek back: ffmpeg leaves 0, which
# libsndfile itself reads to the end of the file (any size under the 8 bytes of SSND's
# offset and block size fields), and SoX 0x7F000000 bytes of audio and 8. From here
# on, the size is unknown: no AIFF accepted here comes near 2 GB.
_AIFF_UNKNOWN = 0x7F000000
# Bytes per sample of the AIFC compression types that store samples whole (0: the
# COMM sample size says); others (ima4, GSM, ...) are packets, left to libsndfile.
_AIFC_WIDTH = {b"NONE": 0, b"twos": 0, b"sowt": 0, b"raw ": 0, b"in24": 3, b"in32": 4,
               b"fl32": 4, b"FL32": 4, b"fl64": 8, b"FL64": 8, b"ulaw": 1, b"ULAW": 1,
               b"alaw": 1, b"ALAW": 1}


def check_whole_aiff(data: bytes, index: int | None) -> None:
    """``InvalidInput`` when an AIFF's SSND chunk declares more audio than the file holds:
    libsndfile clamps the size to the file and decodes what arrived, as for a WAV
    (``whole_wav``), whose tolerance and placeholders this follows. Big-endian IFF:
    FORM, then AIFF or AIFC; COMM gives the channels, sample size, rate (an 80-bit
    float) and for AIFC the compression; SSND's audio follows its offset and block size
    fields, after ``offset`` more bytes. Anything else is left to libsndfile."""
    if data[:4] != b"FORM" or data[8:12] not in (b"AIFF", b"AIFC"):
        return
    byte_rate, block = 0.0, 0
    for pos, tag, size in _chunks(data, ">"):
        body = pos + 8
        if tag == b"COMM" and size >= 18 and len(data) >= body + 18:
            channels, _, bits = struct.unpack_from(">hIh", data, body)
            width = (bits + 7) // 8
            if data[8:12] == b"AIFC":  # its compression type follows the 18 bytes
                stored = _AIFC_WIDTH.get(data[body + 18:body + 22], -1)  # -1: packets
                width = stored if stored else width
            exp, mantissa = struct.unpack_from(">HQ", data, body + 8)
            exp &= 0x7FFF
            if width > 0 and channels > 0 and 16383 <= exp < 16383 + 32:
                block = channels * width
                byte_rate = math.ldexp(mantissa, exp - 16383 - 63) * block
        elif tag == b"SSND":
            if not byte_rate or not 8 <= size < _AIFF_UNKNOWN or body + 8 > len(data):
                return
            offset = struct.unpack_from(">I", data, body)[0]
            declared, held = size - 8 - offset, len(data) - body - 8 - offset
            # A last frame or pad byte short loses no audio: from a frame and 10 ms.
            if declared > 0 and declared - held >= max(block, byte_rate / 100):
                raise InvalidInput(f"the AIFF header declares {declared / byte_rate:.2f} s "
                                   f"of audio but the file holds "
                                   f"{max(held, 0) / byte_rate:.2f} s: it was cut short",
                                   index=index, kind=UNSUPPORTED)
            return


# Pages walked before libsndfile is left to decide (100,000 take 40 ms): 300 s of audio,
# the most accepted, even at one 3 ms packet a page (writers put 20 ms and more in
# one), where 50 MB of empty 27-byte pages would hold Python here for two million.
_OGG_PAGES = 100_000


def check_whole_ogg(data: bytes, index: int | None) -> None:
    """``InvalidInput`` when an Ogg file ends inside a page: an upload cut short. libogg
    drops the partial page and libsndfile gives the length the last whole page's
    granule position says, so 12 s of a 20 s clip were decoded as if whole. A page is
    "OggS", 22 bytes, a segment count, that many segment sizes, then the segments.

    A file that ends at a page boundary is read, with or without the end-of-stream flag
    (0x04 in the last page's header type): without it, it is a stream captured live or
    a recorder stopped before it closed the file as often as a cut that fell between two
    pages (a cut at a random byte does so about once in 4,000). Bytes that are not a
    page (a tag after the last) are left to libsndfile."""
    if data[:4] != b"OggS":
        return
    pos, end = 0, len(data)
    for _ in range(_OGG_PAGES):
        if pos == end:
            return
        head, rest = data[pos:pos + 4], end - pos
        if head != b"OggS"[:len(head)]:
            return
        segments = data[pos + 26] if rest > 26 else 0
        size = 27 + segments + sum(data[pos + 27:pos + 27 + segments])
        if rest < 27 + segments:
            got = "its header was cut"
        elif rest < size:
            got = f"{rest} of its {size} bytes arrived"
        else:
            pos += size
            continue
        raise InvalidInput(f"the OGG file ends inside a page ({got}): it was cut short",
                           index=index, kind=UNSUPPORTED)


def mp3_length_declared(data: bytes) -> bool:
    """Whether an MP3's first frame is a Xing or Info header that gives its frame count
    (LAME writes one, and ffmpeg writing to a file): libsndfile's length is then the
    encoder's count. Without one it is mpg123's guess from the file's size and a frame's
    bit rate (bytes after the audio make it longer than what decodes), so no audio
    can be said to be missing. False for anything not recognised."""
    pos = 0
    if data[:3] == b"ID3" and len(data) >= 10:  # ID3v2: a syncsafe size, maybe a footer
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 \
            | (data[9] & 0x7F)
        pos = 10 + size + (10 if data[5] & 0x10 else 0)
    head = data[pos:pos + 4]
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0 or (head[1] >> 1) & 3 != 1:
        return False  # not a Layer III frame right there
    mpeg1, mono = (head[1] >> 3) & 3 == 3, head[3] >> 6 == 3
    side = (17 if mono else 32) if mpeg1 else (9 if mono else 17)  # side information
    at = pos + 4 + (0 if head[1] & 1 else 2) + side  # after the CRC, if any
    return (data[at:at + 4] in (b"Xing", b"Info") and len(data) >= at + 8
            and struct.unpack_from(">I", data, at + 4)[0] & 1 == 1)  # its frames field
