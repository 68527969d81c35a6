"""API keys, their ids, and who may see which jobs.

``MMQ_API_KEYS="alice:secret1,bob:secret2,secret3"``: a key may carry a name, which
becomes its **key id**; a key without one gets ``key-`` and a 12-hex-digit prefix of
its SHA-256. The key id, never the key, is stored on the jobs the key submits
(``jobs.owner``), so a leaked database does not leak keys, and renaming or rotating
a key is a configuration change. ``MMQ_ADMIN_KEYS`` (same form) are accepted
everywhere and see and cancel every key's jobs, including those the SDK and CLI
made without a key (owner NULL).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.config import LOCAL_API_KEY, Settings
from producer.web.errors import ApiError

bearer = HTTPBearer(auto_error=False,
                    description="an API key from MMQ_API_KEYS (or MMQ_ADMIN_KEYS)")
# A name fits jobs.owner (String(64)) and cannot be mistaken for a generated id.
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
LOCAL_KEY_ID = "local"


@dataclass(frozen=True)
class Caller:
    """Who made a request: enough to scope what it sees, nothing secret."""

    key_id: str  # stored in jobs.owner
    admin: bool = False
    # Scopes Idempotency-Keys: a hash of the key itself, so two keys never share one.
    key_digest: str = ""

    @property
    def scope(self) -> str | None:
        """The owner to filter jobs by; None (everything) for an admin."""
        return None if self.admin else self.key_id


@dataclass(frozen=True)
class ApiKey:
    secret: bytes
    caller: Caller


def key_id_of(secret: str) -> str:
    """The id of a key without a name: short, stable, and not the key."""
    return f"key-{hashlib.sha256(secret.encode()).hexdigest()[:12]}"


def parse_keys(spec: str, *, admin: bool = False) -> list[ApiKey]:
    """``name:secret`` or ``secret`` entries, comma-separated. A part before the first
    ``:`` is a name only if it looks like one, so a secret containing ``:`` without
    a name is ambiguous: give such a key a name."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = key_id_of(entry), entry
        elif not NAME.fullmatch(name) or not secret:
            raise ValueError(f"API key entry {name[:8]}…: a key name is 1-64 of "
                             "A-Z a-z 0-9 _ . @ -, followed by ':' and the key")
        out.append(ApiKey(secret.encode(), Caller(
            key_id=name, admin=admin,
            key_digest=hashlib.sha256(secret.encode()).hexdigest()[:16])))
    return out


def keyring(settings: Settings) -> list[ApiKey]:
    """Every key the API accepts. The local/dev profile's development key is an admin
    (one user on loopback, who also submits through the CLI), and only while no key
    is configured at all."""
    keys = parse_keys(settings.api_keys) + parse_keys(settings.admin_keys, admin=True)
    if not keys and settings.local:
        keys = [ApiKey(LOCAL_API_KEY.encode(), Caller(
            key_id=LOCAL_KEY_ID, admin=True,
            key_digest=hashlib.sha256(LOCAL_API_KEY.encode()).hexdigest()[:16]))]
    return keys


def require_key(request: Request,
                cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                ) -> Caller:
    """The caller, or 401. Every configured key is compared, in constant time and
    without stopping at a match, so the response time says nothing about which key
    or how much of one matched."""
    token = (cred.credentials if cred else "").encode()
    found: Caller | None = None
    for key in request.app.state.keyring:
        if hmac.compare_digest(token, key.secret) and found is None:
            found = key.caller
    if found is None:
        raise ApiError(401, "unauthorized", "missing or invalid API key "
                       "(Authorization: Bearer <key>)", headers={"WWW-Authenticate": "Bearer"})
    return found


# Routes take ``caller: CallerDep``: the authenticated caller, or the request is a 401.
CallerDep = Annotated[Caller, Depends(require_key)]
