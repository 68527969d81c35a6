"""A transcribe job's transcript in OpenAI's ``response_format``s: json, text, srt, vtt
and verbose_json. The segments are the prediction's (``[start s, end s, text]``, from
Whisper's timestamp tokens: core/model/whisper/timestamps.py); their texts joined and
stripped are the transcript, which ``text`` and ``json`` return as the job has it."""

from __future__ import annotations

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: list) -> str:
    return "".join(f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{t.strip()}\n\n"
                   for i, (a, b, t) in enumerate(segments, 1))


def vtt(segments: list) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(a, '.')} --> {_clock(b, '.')}\n{t.strip()}\n\n"
                                  for a, b, t in segments)


def verbose(text: str, segments: list, duration: float | None) -> dict:
    """OpenAI's verbose_json: the fields mmq has. ``seek`` is the segment's 30 s window
    (in 10 ms frames, as Whisper counts it); decoding is deterministic, so temperature 0."""
    return {
        "task": "transcribe", "language": "english",
        "duration": duration if duration is not None else
        (float(segments[-1][1]) if segments else 0.0),
        "text": text,
        "segments": [{"id": i, "seek": int(a // 30) * 3000, "start": a, "end": b,
                      "text": t, "tokens": [], "temperature": 0.0}
                     for i, (a, b, t) in enumerate(segments)],
    }


def render_transcript(fmt: str, text: str, segments: list | None,
                      duration: float | None = None) -> tuple[dict | str, str]:
    """-> (body, media type). A prediction stored before segments were decoded has none:
    the whole transcript is then one segment over the clip."""
    if segments is None:
        segments = [[0.0, duration or 0.0, text]] if text else []
    if fmt == "json":
        return {"text": text}, "application/json"
    if fmt == "text":
        return text, "text/plain"
    if fmt == "srt":
        return srt(segments), "application/x-subrip"
    if fmt == "vtt":
        return vtt(segments), "text/vtt"
    return verbose(text, segments, duration), "application/json"
