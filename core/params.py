"""A job's parameters (labels, top_k, timeout_s or deadline): the one place their
types and bounds are checked. The SDK calls ``job_params`` for every item, and the
API and CLI submit through the SDK, so all three refuse the same things with the
same words; no torch here, so a producer pays nothing to import it."""

from __future__ import annotations

import math
import operator
import unicodedata
from datetime import UTC, datetime
from numbers import Real

from core.config import Settings
from core.errors import InvalidInput

# Default-ignorable code points (Unicode's DerivedCoreProperties.txt) that are not of
# category Cf: fillers and selectors that render as nothing (U+3164 HANGUL FILLER is a
# well-known "invisible" name). The tag block U+E0000..E0FFF is checked by range.
_IGNORABLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u3164"
                       "\uffa0" + "".join(map(chr, range(0xFE00, 0xFE10))))


def _invisible(ch: str) -> bool:
    """Whitespace, a control or format character (Cc, Cf: zero-width spaces and
    joiners, the BOM, direction marks, soft hyphens), or a default-ignorable one.
    A text made only of these was embedded as an empty string (the tokenizer drops
    them) and looked empty to whoever read it, so it is refused as empty text is;
    among visible characters they are kept (a ZWNJ is part of written Persian)."""
    return (ch.isspace() or ch in _IGNORABLE or 0xE0000 <= ord(ch) <= 0xE0FFF
            or unicodedata.category(ch) in ("Cc", "Cf"))


# Combining marks: nonspacing (Mn: accents, virama, harakat, Thai vowel signs) and
# enclosing (Me: U+20DD COMBINING ENCLOSING CIRCLE). They draw on the character before
# them; a text of marks alone was accepted and embedded as an empty string (the tokenizer
# strips Mn as accents; a lone Me it reads as [UNK]). Spacing marks (Mc, such as the
# Devanagari vowel sign U+093E) take their own width and are kept as base characters.
_MARKS = ("Mn", "Me")


def _base(ch: str) -> bool:
    """A character that shows on its own: neither invisible nor a combining mark."""
    return not _invisible(ch) and unicodedata.category(ch) not in _MARKS


def nothing_visible(text: str, most: int = 4) -> str | None:
    """None if ``text`` has a base character (one that shows on its own, which the
    combining marks of Hindi, Thai, Arabic or NFD accents then sit on); else what it
    holds, by code point and name (printing the characters would show nothing, or a
    mark over a dotted circle): "whitespace, U+200B ZERO WIDTH SPACE", "U+0301
    COMBINING ACUTE ACCENT (combining marks with no base character to carry them)".
    For texts and labels alike: each is a text the model embeds."""
    if any(_base(ch) for ch in text):  # stops at the first one
        return None
    found = list(dict.fromkeys(ch for ch in text if not ch.isspace()))
    names = ["whitespace"] if any(ch.isspace() for ch in text) else []
    names += [f"U+{ord(ch):04X} {unicodedata.name(ch, 'a control character')}"
              for ch in found[:most]]
    if len(found) > most:
        names.append(f"and {len(found) - most} more")
    marks = any(unicodedata.category(ch) in _MARKS for ch in found)
    return ", ".join(names) + (" (combining marks with no base character to carry them)"
                               if marks else "")


def label_text(label: str) -> str:
    """A label as it is compared and stored: stripped, in Unicode NFC, so that "café"
    typed as one code point and as "e" + a combining accent (NFD, as macOS names
    files) is one label, not two."""
    return unicodedata.normalize("NFC", label.strip())


def check_labels(labels: object, *, max_labels: int | None = None,
                 max_chars: int | None = None) -> list[str]:
    """Distinct non-empty label strings, stripped and in NFC (``label_text``). The
    bounds are the producers' (``None``: unbounded, as a worker reading an already
    accepted job uses it)."""
    if isinstance(labels, str) or not isinstance(labels, list | tuple) or not labels:
        raise InvalidInput("labels must be a non-empty list of strings")
    if max_labels is not None and len(labels) > max_labels:
        # Every label is a text the model embeds: 10,000 of them held a worker's
        # text batches for 15 s.
        raise InvalidInput(f"labels: {len(labels)} given, over the limit of {max_labels} "
                           "per job")
    clean = []
    for lb in labels:
        if not isinstance(lb, str) or not lb.strip():
            raise InvalidInput(f"label {lb!r} is not a non-empty string")
        if (only := nothing_visible(lb)) is not None:  # embedded as an empty string
            # ascii(): repr would print a combining mark raw, drawn over the quote.
            raise InvalidInput(f"label {ascii(lb)} has no visible characters, only {only}")
        if "\x00" in lb:  # PostgreSQL text cannot hold NUL; nor can a tokenizer use it
            raise InvalidInput(f"label {lb!r} contains a NUL character")
        try:  # a lone surrogate (JSON "\ud800") is no text either; PostgreSQL refuses it
            lb.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"label {lb!r} is not valid Unicode (a lone surrogate)") from None
        lb = label_text(lb)
        if max_chars is not None and len(lb) > max_chars:
            raise InvalidInput(f"label {lb[:20]!r}... has {len(lb)} characters, "
                               f"over the limit of {max_chars}")
        clean.append(lb)
    if len(set(clean)) != len(clean):
        raise InvalidInput("labels must be distinct")
    return clean


def check_top_k(value: object, max_top_k: int) -> int:
    """An integer 1..max_top_k; bool and float are refused rather than rounded."""
    try:
        if isinstance(value, bool):
            raise TypeError
        k = operator.index(value)  # int and numpy integers, not 2.5 or "5"
    except TypeError:
        raise InvalidInput(f"top_k must be an integer, got {value!r}") from None
    if not 1 <= k <= max_top_k:
        raise InvalidInput(f"top_k must be between 1 and {max_top_k}, got {k}")
    return k


def check_timeout(value: object, max_timeout_s: float) -> float:
    """Seconds, a finite number in (0, max_timeout_s]."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidInput(f"timeout_s must be a number of seconds, got {value!r}")
    try:
        t = float(value)
    except OverflowError:  # an int past float's range (2**1100): no deadline either
        t = math.inf
    if not (math.isfinite(t) and 0 < t <= max_timeout_s):
        raise InvalidInput(f"timeout_s must be above 0 and at most {max_timeout_s:g} "
                           f"seconds, got {value!r}"[:200])
    return t


def check_instant(value: object, name: str) -> datetime:
    """A timezone-aware datetime, or a naive one taken as UTC, in UTC (what the store
    keeps). One with no UTC instant (0001-01-01T00:00+14:00 is in year 0 in UTC) is
    ``InvalidInput``: the conversion raises OverflowError, a 500 at the API."""
    if not isinstance(value, datetime):
        raise InvalidInput(f"{name} must be a datetime (timezone-aware, or naive UTC), "
                           f"got {type(value).__name__} {value!r}"[:200])
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (OverflowError, ValueError):
        raise InvalidInput(f"{name} out of range: {value} has no UTC date "
                           "(0001-01-01 to 9999-12-31)") from None


def check_deadline(value: object) -> datetime:
    """A timezone-aware datetime, or a naive one taken as UTC (what the store keeps)."""
    return check_instant(value, "deadline")


def job_params(item: dict, task: str,
               settings: Settings) -> tuple[dict, datetime | None, float | None]:
    """(params, deadline, timeout_s) of one submitted item, or ``InvalidInput`` without
    an index (the caller adds it). ``timeout_s`` wins over ``deadline`` when both are
    given; it stays a duration here: the store turns it into a deadline with the
    database's clock, since the producer's own clock may be off."""
    params: dict = {}
    # Checked even where the task ignores it: a bad value is a client bug either way.
    top_k = check_top_k(5 if item.get("top_k") is None else item["top_k"], settings.max_top_k)
    if task == "classify":
        params["labels"] = check_labels(item.get("labels") or [],
                                        max_labels=settings.max_labels,
                                        max_chars=settings.max_label_chars)
        params["top_k"] = top_k
    if item.get("timeout_s") is not None:
        return params, None, check_timeout(item["timeout_s"], settings.max_timeout_s)
    deadline = item.get("deadline")
    return params, None if deadline is None else check_deadline(deadline), None
