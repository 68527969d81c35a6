"""Which webhook URLs mmq accepts: http(s) only, and hosts that resolve to public
addresses only, unless ``MMQ_WEBHOOK_ALLOW_PRIVATE`` (tests, local development).

Without the address check any key holder could make mmq POST to the services inside
its own network (SSRF): the database, Redis, a cloud metadata endpoint. The check runs
at submit (``InvalidInput``, a 422) and again before each delivery, because a name can
resolve differently later (DNS rebinding); redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from core.errors import InvalidInput

MAX_URL_CHARS = 2000


def blocked_address(ip: str) -> bool:
    """Private, loopback, link-local, multicast, reserved or unspecified (IPv4-mapped
    IPv6 addresses are judged as the IPv4 address they carry)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not addr.is_global or addr.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to now (OSError if none)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)})


def check_url(url: object, *, allow_private: bool, index: int | None = None) -> str:
    """The URL if mmq may POST to it, else ``InvalidInput`` saying why."""
    def bad(why: str) -> InvalidInput:
        return InvalidInput(f"webhook_url: {why}", index=index)

    if not isinstance(url, str) or not url:
        raise bad(f"must be an http(s) URL, got {type(url).__name__}")
    if len(url) > MAX_URL_CHARS:
        raise bad(f"longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise bad(f"not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise bad(f"only http and https URLs are accepted, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise bad("the URL names no host")
    if parts.username or parts.password:
        raise bad("credentials in the URL are not accepted (put a token in its path)")
    if allow_private:
        return url
    try:
        addresses = resolve(parts.hostname, port)
    except (OSError, UnicodeError) as e:
        raise bad(f"host {parts.hostname!r} does not resolve ({e})") from None
    blocked = [a for a in addresses if blocked_address(a)]
    if blocked:
        raise bad(f"host {parts.hostname!r} resolves to a private, loopback or link-local "
                  f"address ({blocked[0]}); mmq only calls public addresses")
    return url
