"""The one error shape of the API and the page, and how input errors map to statuses.

Every API error, whatever raised it, is ``{"error": {"status", "code", "message",
"details"}}``: clients branch on ``code``, people read ``message``. The page renders
the same ``ApiError`` as an error page.
"""

from __future__ import annotations

from typing import Any

from core.errors import InvalidInput


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, details: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message,
                          "details": self.details}}


ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_input", 429: "queue_full",
               500: "internal", 503: "unavailable"}

# Seconds a client is told to wait when its modality's queue is over the limit.
RETRY_AFTER_S = 5
INPUT_STATUS = {InvalidInput.INVALID: 422, InvalidInput.TOO_LARGE: 413,
                InvalidInput.UNSUPPORTED: 415}
