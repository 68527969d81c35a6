"""Errors shared by the model, the store, the workers and the producers."""

from __future__ import annotations

import traceback


class InvalidInput(ValueError):
    """One input item cannot be processed; the message says which and why.

    Raised per item, so a caller can fail that one job and keep the rest of a batch.
    Retrying does not help: the worker marks the job ``failed`` without retry.
    """

    # What kind of bad: an API maps these to 422, 413 and 415 respectively.
    INVALID, TOO_LARGE, UNSUPPORTED = "invalid", "too_large", "unsupported_media"

    def __init__(self, reason: str, *, index: int | None = None, kind: str = INVALID):
        self.reason = reason
        self.index = index
        self.kind = kind
        where = f"item {index}: " if index is not None else ""
        super().__init__(f"{where}{reason}")


def check_payload_size(data: bytes, max_bytes: int, what: str, index: int | None = None) -> None:
    """Refuse empty and oversized payloads before any decoder sees them."""
    if not data:
        raise InvalidInput(f"{what} is empty (0 bytes)", index=index)
    if len(data) > max_bytes:
        raise InvalidInput(f"{what} is {len(data)} bytes, over the limit of {max_bytes}",
                           index=index, kind=InvalidInput.TOO_LARGE)


def brief_error(e: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an error, at most ``limit`` characters of it; for a
    SQLAlchemy error the database driver's own message (without the statement).

    For log lines: SQLAlchemy's own message carries the whole statement and its
    parameters (a group commit's: tens of KB), and a warning repeated every few seconds
    through an outage should be one short line. Here rather than in core/serving, so
    that any package (core/webhooks, workers) logs with it without importing serving."""
    orig = getattr(e, "orig", None)
    lines = str(orig if orig is not None else e).strip().splitlines()
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:limit]}"


def brief_traceback(e: BaseException) -> str:
    """The traceback of ``e`` and of the errors it was raised from or while handling,
    as Python prints them, but each error's message cut to ``brief_error``'s line.

    For a logged bug (a 500) that is a database error: where it happened, without the
    statement and parameters (a user's data) that SQLAlchemy puts in its message and
    ``log.exception`` would print. Frames name files, lines and code, never values."""
    chain: list[BaseException] = []
    err: BaseException | None = e
    while err is not None and not any(err is seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    parts: list[str] = []
    for i, err in enumerate(reversed(chain)):
        if i:
            parts.append("\nThe above exception was the direct cause of the following "
                         "exception:\n\n" if err.__cause__ is not None else
                         "\nDuring handling of the above exception, another exception "
                         "occurred:\n\n")
        if err.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(err.__traceback__))
        parts.append(brief_error(err) + "\n")
    return "".join(parts).rstrip("\n")
