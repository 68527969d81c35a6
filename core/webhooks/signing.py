"""Standard Webhooks signatures (https://www.standardwebhooks.com/): the headers
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body`` under the secret's key)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret; ValueError if it is not one."""
    if not secret.startswith(PREFIX):
        raise ValueError("MMQ_WEBHOOK_SECRET must look like whsec_<base64>")
    try:
        key = base64.b64decode(secret[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("MMQ_WEBHOOK_SECRET: the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("MMQ_WEBHOOK_SECRET: the key is under 16 bytes")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, msg_id, timestamp, body),
            "content-type": "application/json"}
