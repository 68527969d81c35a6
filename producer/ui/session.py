"""Sign-in for the results page: a signed session cookie and CSRF tokens.

The page is behind the API's own keys (``producer/web/auth.py``): signing in with a
key makes the browser a caller with exactly that key's view. The cookie does not
carry the key itself but the key's digest (``Caller.key_digest``) and a per-sign-in
nonce, signed with HMAC-SHA256 under ``MMQ_UI_SECRET``:

    mmq_ui = base64url(json [key_digest, nonce]) "." base64url(hmac)

Each request looks the digest up in the keyring again, so a key removed from
``MMQ_API_KEYS`` ends its sessions at the next request, and a stolen cookie never
reveals a key. Each request also checks the nonce's row in the store
(``core/store/ui_signins.py``): sign-out deletes it, so a replayed cookie is refused
by every API process on every host, and the row's expiry is the database server's
clock, so no two hosts' clocks are compared. The cookie is ``HttpOnly`` (no script
reads it), ``Secure`` and ``SameSite=Lax`` (no cross-site POST carries it). CSRF
tokens are an HMAC of the session's nonce, so a token is good for one sign-in only;
every POST also has to come from the page's own origin when the browser says where
it came from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.store import ui_signins
from producer.web.auth import ApiKey, Caller

COOKIE = "mmq_ui"
PATH = "/ui"


@dataclass(frozen=True)
class UiSession:
    caller: Caller
    nonce: str  # per sign-in: its row in the store; the CSRF token is derived from it


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Issues and checks the page's cookies for one API process; the sign-ins
    themselves live in the store, shared by every process."""

    def __init__(self, settings: Settings, keyring: list[ApiKey],
                 db: sessionmaker[Session]):
        # A per-process secret when none is set: safe (nothing outlives the process),
        # but each API process then signs differently (see Settings.ui_secret).
        self._secret = settings.ui_secret.encode() or secrets.token_bytes(32)
        self._keyring = keyring
        self._db = db
        self.max_age = settings.ui_session_s
        self.secure = settings.ui_secure_cookie

    def _mac(self, purpose: str, payload: bytes) -> bytes:
        return hmac.new(self._secret, purpose.encode() + b"\0" + payload, hashlib.sha256).digest()

    def caller_for_key(self, key: str) -> Caller | None:
        """The caller this key is, compared like ``require_key`` does: every key, in
        constant time, without stopping at a match."""
        token = key.strip().encode()
        found = None
        for k in self._keyring:
            if hmac.compare_digest(token, k.secret) and found is None:
                found = k.caller
        return found

    def issue(self, caller: Caller) -> str:
        """A new sign-in: its row in the store, and the cookie that names it."""
        nonce = secrets.token_urlsafe(16)
        with self._db.begin() as s:
            ui_signins.open_signin(session=s, nonce=nonce,
                                   lifetime=timedelta(seconds=self.max_age))
        payload = json.dumps([caller.key_digest, nonce]).encode()
        return f"{_b64(payload)}.{_b64(self._mac('session', payload))}"

    def revoke(self, session: UiSession) -> None:
        """Sign-out: this sign-in's cookie is refused from now on, on every host."""
        with self._db.begin() as s:
            ui_signins.close_signin(session=s, nonce=session.nonce)

    def read(self, cookie: str | None) -> UiSession | None:
        """The session the cookie proves, or None (absent, forged, signed out, expired,
        or its key is no longer configured). Reads the store: call it off the event
        loop."""
        session = self.signed(cookie)
        if session is None:
            return None
        with self._db() as s:
            if not ui_signins.signin_live(session=s, nonce=session.nonce):
                return None
        return session

    def signed(self, cookie: str | None) -> UiSession | None:
        """The session the cookie's signature proves, its key still configured, without
        asking the store whether it is still signed in: only for answering a form that
        met a store outage with itself again (``pages.store_down_form``), never for reading
        or writing anything."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        try:
            payload, given = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(given, self._mac("session", payload)):
            return None
        try:
            digest, nonce = json.loads(payload)
        except (ValueError, TypeError):
            return None
        callers = [k.caller for k in self._keyring
                   if hmac.compare_digest(k.caller.key_digest.encode(), str(digest).encode())]
        if not callers:
            return None
        return UiSession(callers[0], str(nonce))

    def csrf_token(self, session: UiSession) -> str:
        return _b64(self._mac("csrf", session.nonce.encode()))

    def csrf_ok(self, session: UiSession, token: object) -> bool:
        return isinstance(token, str) and hmac.compare_digest(
            token.encode(), self.csrf_token(session).encode())

    def set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(COOKIE, value, max_age=int(self.max_age), path=PATH,
                            secure=self.secure, httponly=True, samesite="lax")

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path=PATH, secure=self.secure, httponly=True,
                               samesite="lax")


def same_origin(request: Request) -> bool:
    """A POST from this site, as far as the browser says: ``Origin`` (or, without
    it, ``Referer``) names this host. Neither header (a script, not a browser):
    allowed, since a forged cross-site request always comes from a browser."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    host = request.headers.get("host", "")
    return urlsplit(source).netloc == host
