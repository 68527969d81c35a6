"""The bad inputs of bench/chaos.py's scenario 8: what is sent through the API (each
must get a 4xx) and through the SDK (each must raise ``InvalidInput``)."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib


def png(w: int = 8, h: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(side: int = 100_000) -> bytes:
    """A few hundred bytes whose header claims side x side pixels (10 G pixels)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    rows = zlib.compress(b"\0" * (side + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(
        b"IEND", b"")


def wav(rate: int, frames: int) -> bytes:
    data = b"\0\1" * frames
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


MAX_REQUEST, MAX_PAYLOAD = 4 * 2**20, 2 * 2**20  # the API's limits in this scenario


def api_cases() -> list[tuple[str, dict]]:
    """(name, httpx request kwargs): each must get a 4xx."""
    raw = {"Content-Type": "application/json"}
    ok_png = png()
    cases = [
        ("NUL in text", {"json": {"text": "a\x00b"}}),
        ("lone surrogate in text", {"content": b'{"text": "\\ud800"}', "headers": raw}),
        ("invalid UTF-8 body", {"content": b'{"text": "\xff\xfe"}', "headers": raw}),
        ("100,000 nested [", {"content": b"[" * 100_000, "headers": raw}),
        ("100,000 nested {", {"content": b'{"a":' * 100_000, "headers": raw}),
        ("top_k='five'", {"json": {"text": "x", "task": "classify", "labels": ["a"],
                                   "top_k": "five"}}),
        ("timeout_s='soon'", {"json": {"text": "x", "timeout_s": "soon"}}),
        ("timeout_s=1e300", {"json": {"text": "x", "timeout_s": 1e300}}),
        ("timeout_s=NaN", {"content": b'{"text": "x", "timeout_s": NaN}', "headers": raw}),
        ("timeout_s=-1", {"json": {"text": "x", "timeout_s": -1}}),
        ("top_k=10**12", {"json": {"text": "x", "task": "classify", "labels": ["a"],
                                   "top_k": 10**12}}),
        ("top_k=0", {"json": {"text": "x", "task": "classify", "labels": ["a"], "top_k": 0}}),
        ("deadline='tomorrow'", {"json": {"text": "x", "deadline": "tomorrow"}}),
        ("10,000 labels", {"json": {"text": "x", "task": "classify",
                                    "labels": [f"label {i}" for i in range(10_000)]}}),
        ("classify, no labels", {"json": {"text": "x", "task": "classify"}}),
        ("labels a string", {"json": {"text": "x", "task": "classify", "labels": "a,b"}}),
        ("labels numbers", {"json": {"text": "x", "task": "classify", "labels": [1, 2]}}),
        ("labels duplicate", {"json": {"text": "x", "task": "classify", "labels": ["a", "a"]}}),
        ("empty text", {"json": {"text": ""}}),
        ("whitespace text", {"json": {"text": "  \n\t "}}),
        ("text a number", {"json": {"text": 123}}),
        ("text a list", {"json": {"text": ["a"]}}),
        ("no text at all", {"json": {}}),
        ("modality video", {"json": {"modality": "video", "text": "x"}}),
        ("task dance", {"json": {"text": "x", "task": "dance"}}),
        ("unknown field", {"json": {"text": "x", "priority": 9}}),
        ("body null", {"content": b"null", "headers": raw}),
        ("body a list", {"json": ["x"]}),
        ("body a string", {"json": "x"}),
        ("text over MMQ_MAX_TEXT_CHARS", {"json": {"text": "a" * 100_001}}),
        ("body over MMQ_MAX_REQUEST_BYTES", {"json": {"text": "a" * (MAX_REQUEST + 10)}}),
        ("text/plain body", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}),
        ("no content type", {"content": b'{"text": "x"}'}),
        ("bad base64", {"json": {"modality": "image", "data_base64": "%%%not base64"}}),
        ("image with text", {"json": {"modality": "image", "text": "x"}}),
        ("text with data_base64", {"json": {"text": "x", "data_base64": b64(b"x")}}),
        ("WAV claiming 2,000,000,000 Hz", {"json": {"modality": "audio",
                                                     "data_base64": b64(wav(2_000_000_000,
                                                                            16000))}}),
        ("empty audio (0 frames)", {"json": {"modality": "audio",
                                             "data_base64": b64(wav(16000, 0))}}),
        ("corrupt PNG", {"json": {"modality": "image",
                                  "data_base64": b64(ok_png[:40] + b"garbage" * 8)}}),
        ("decompression-bomb PNG", {"json": {"modality": "image",
                                             "data_base64": b64(bomb_png())}}),
        ("0-byte upload", {"files": {"file": ("empty.png", b"", "image/png")}}),
        ("upload of plain text", {"files": {"file": ("a.png", b"hello", "image/png")}}),
        ("upload, bomb PNG", {"files": {"file": ("bomb.png", bomb_png(), "image/png")}}),
        ("upload, 2 GHz WAV", {"files": {"file": ("a.wav", wav(2_000_000_000, 16000),
                                                  "audio/wav")}}),
        ("upload over MMQ_MAX_PAYLOAD_BYTES", {"files": {"file": (
            "big.png", ok_png + os.urandom(MAX_PAYLOAD + 10), "image/png")}}),
        ("upload, modality video", {"files": {"file": ("a.png", ok_png, "image/png")},
                                    "data": {"modality": "video"}}),
        ("upload, 10,000 labels", {"files": {"file": ("a.png", ok_png, "image/png")},
                                   "data": {"task": "classify", "labels": ",".join(
                                       f"l{i}" for i in range(10_000))}}),
        ("upload, top_k='five'", {"files": {"file": ("a.png", ok_png, "image/png")},
                                  "data": {"task": "classify", "labels": "a,b",
                                           "top_k": "five"}}),
        ("batch, 1,001 files", {"batch": True, "files": [
            ("files", (f"{i}.png", ok_png, "image/png")) for i in range(1001)]}),
        ("batch, 1,001 JSON items", {"batch": True, "json": {
            "items": [{"text": f"x{i}"} for i in range(1001)]}}),
        ("batch, no items", {"batch": True, "json": {"items": []}}),
        ("batch, items not a list", {"batch": True, "json": {"items": "x"}}),
        ("multipart, no file", {"files": {"other": ("a.txt", b"x", "text/plain")}}),
    ]
    return cases


def sdk_cases() -> list[tuple[str, object]]:
    """(name, the items argument of submit_many): each must raise InvalidInput."""
    ok_png = png()
    t = {"modality": "text", "input": "x"}
    cl = {**t, "task": "classify", "labels": ["a", "b"]}
    return [
        ("NUL in text", [{**t, "input": "a\x00b"}]),
        ("lone surrogate in text", [{**t, "input": "\ud800"}]),
        ("top_k='five'", [{**cl, "top_k": "five"}]),
        ("timeout_s='soon'", [{**t, "timeout_s": "soon"}]),
        ("timeout_s=1e300", [{**t, "timeout_s": 1e300}]),
        ("timeout_s=NaN", [{**t, "timeout_s": float("nan")}]),
        ("top_k=10**12", [{**cl, "top_k": 10**12}]),
        ("deadline='tomorrow'", [{**t, "deadline": "tomorrow"}]),
        ("10,000 labels", [{**cl, "labels": [f"label {i}" for i in range(10_000)]}]),
        ("labels a string", [{**cl, "labels": "a,b"}]),
        ("empty text", [{**t, "input": ""}]),
        ("text a number", [{**t, "input": 123}]),
        ("text None", [{**t, "input": None}]),
        ("text over max_text_chars", [{**t, "input": "a" * 100_001}]),
        ("modality video", [{**t, "modality": "video"}]),
        ("task dance", [{**t, "task": "dance"}]),
        ("item None", [None]),
        ("item a string", ["hello"]),
        ("items a string", "hello"),
        ("WAV claiming 2,000,000,000 Hz", [{"modality": "audio",
                                            "input": wav(2_000_000_000, 16000)}]),
        ("empty audio (0 frames)", [{"modality": "audio", "input": wav(16000, 0)}]),
        ("0-byte image", [{"modality": "image", "input": b""}]),
        ("corrupt PNG", [{"modality": "image", "input": ok_png[:40] + b"garbage" * 8}]),
        ("decompression-bomb PNG", [{"modality": "image", "input": bomb_png()}]),
        ("image over max_payload_bytes", [{"modality": "image",
                                           "input": ok_png + b"\0" * (21 * 2**20)}]),
        ("image a number", [{"modality": "image", "input": 5}]),
        ("image path missing", [{"modality": "image", "input": "/nonexistent/x.png"}]),
    ]
