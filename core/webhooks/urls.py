"""Which webhook URLs mmq accepts: http(s) only, and hosts that resolve to public
addresses only, unless ``MMQ_WEBHOOK_ALLOW_PRIVATE`` (tests, local development).

Without the address check any key holder could make mmq POST to the services inside
its own network (SSRF): the database, Redis, a cloud metadata endpoint. The check runs
at submit (``InvalidInput``, a 422) and again before each delivery, because a name can
resolve differently later (DNS rebinding); redirects are never followed.

The URL's form is checked in every mode (development too): one that http.client will
not send (whitespace or control characters, non-ASCII), with no port to connect to, or
with a host that is no host name would fail every delivery attempt for the whole retry
window, and a NUL is a 500 on PostgreSQL (no NUL in text columns) instead of a 422.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from urllib.parse import SplitResult, urlsplit

from core.errors import InvalidInput

MAX_URL_CHARS = 2000
MAX_HOST_CHARS = 253  # a DNS name's limit, without its trailing dot
# A DNS label: 1 to 63 letters, digits, hyphens, not starting or ending with a hyphen.
# Underscores too: not in host names by RFC 1123, but real names have them and DNS
# resolves them.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)


# IPv6 forms that carry an IPv4 address in their last 32 bits. Traffic to them can
# reach that IPv4 host (a dual-stack socket for the mapped form, a NAT64 gateway for
# 64:ff9b::/96), so they are judged as the IPv4 address, never as IPv6 (where the
# stdlib calls most of them global, loopback included).
_LOW32_EMBEDS = (
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated; :: and ::1 are
    # 0.0.0.0 and 0.0.0.1 here, refused as such)
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
)
# Refused whatever they carry: local-use NAT64 (RFC 8215) translates into the
# operator's own network, and Teredo (2001::/32) embeds its client obfuscated behind a
# relay we do not choose. The stdlib judges both not global on 3.11, but its lists of
# special ranges change between Python versions, so this does not lean on them.
_NEVER = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("2001::/32"),
)


def _v4_blocked(addr: ipaddress.IPv4Address) -> bool:
    return not addr.is_global or addr.is_multicast


def blocked_address(ip: str) -> bool:
    """Private, loopback, link-local, multicast, reserved or unspecified. An IPv6 address
    that carries an IPv4 one (mapped, compatible, translated, NAT64, 6to4) is judged as
    the IPv4 address it carries; local-use NAT64 and Teredo are always refused."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv4Address):
        return _v4_blocked(addr)
    if any(addr in net for net in _NEVER):
        return True
    if any(addr in net for net in _LOW32_EMBEDS):
        return _v4_blocked(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr.sixtofour is not None:  # 2002::/16, the IPv4 in bits 16-48
        return _v4_blocked(addr.sixtofour)
    return not addr.is_global or addr.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to now (OSError if none)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)})


def char_problem(url: str) -> str | None:
    """Why a character of ``url`` keeps it from ever being sent, or None. http.client
    refuses whitespace and control characters anywhere in the request line (InvalidURL)
    and encodes it, and the Host header, as ASCII."""
    for i, ch in enumerate(url):
        if ch.isspace() or unicodedata.category(ch) == "Cc":
            return (f"contains a whitespace or control character ({ch!r} at position {i}); "
                    f"percent-encode it (a space is %20) or leave it out")
        if not ch.isascii():
            return (f"contains a non-ASCII character ({ch!r} at position {i}); "
                    f"percent-encode it in the path or query, and write a host name in "
                    f"its ASCII form (xn--...)")
    return None


def host_problem(host: str) -> str | None:
    """Why ``host`` (a URL's hostname: lower case, no brackets) is neither an address
    nor a DNS name, or None. An empty or over-long label makes the resolver's IDNA
    encoding raise UnicodeError, other characters a name no DNS server answers."""
    try:
        ipaddress.ip_address(host)  # an address literal (IPv6 ones are unbracketed here)
        return None
    except ValueError:
        pass
    name = host.removesuffix(".")  # a fully qualified name may end in a dot
    if len(name) > MAX_HOST_CHARS or not all(_LABEL.fullmatch(label)
                                             for label in name.split(".")):
        return (f"host {host!r} is not a valid host name (dot-separated labels of 1 to 63 "
                f"letters, digits or hyphens, {MAX_HOST_CHARS} characters at most)")
    return None


def url_port(parts: SplitResult) -> int:
    """The port to connect to: the URL's, else the scheme's. ValueError if the URL's is
    not a number in 1..65535 (``SplitResult.port`` lets 0 through, and nothing listens
    on port 0)."""
    port = parts.port  # ValueError: not a number, or over 65535
    if port == 0:
        raise ValueError("port 0")
    return port or (443 if parts.scheme == "https" else 80)


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
    except ValueError as e:
        raise bad(f"not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise bad(f"only http and https URLs are accepted, got {parts.scheme or 'none'!r}")
    if why := char_problem(url):
        raise bad(why)
    if not parts.hostname:
        raise bad("the URL names no host")
    if parts.username or parts.password:
        raise bad("credentials in the URL are not accepted (put a token in its path)")
    if why := host_problem(parts.hostname):
        raise bad(why)
    try:
        port = url_port(parts)
    except ValueError as e:
        raise bad(f"the port must be a number in 1..65535 ({e})") from None
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
