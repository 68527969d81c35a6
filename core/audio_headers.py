"""Audio containers' own sizes against the bytes that arrived, read with struct before
libsndfile sees the bytes: libsndfile decodes a file cut short as far as it goes, and
says so only in its log. Anything these walks do not recognise is left to libsndfile.
"""

from __future__ import annotations

import struct

from core.errors import InvalidInput

UNSUPPORTED = InvalidInput.UNSUPPORTED  # undecodable bytes: HTTP 415


# A WAV's data size when its writer could not seek back to fill it in (streaming to a
# pipe): ffmpeg leaves 0xFFFFFFFF, SoX 0x7FFFF000, GStreamer 0x7FFF0000, arecord
# 0x7FFFFFFF or so, and a recorder stopped before it closed the file, 0. The audio runs
# to the file's end. No WAV accepted here comes near 2 GB (AudioConfig.max_bytes).
_WAV_UNKNOWN = 0x7FFF0000
_WAV_CHUNKS = 100  # looked at before "data" (fmt, fact, LIST, bext, JUNK, ...); then
# libsndfile decides: a file of empty chunks would loop here a million times


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
