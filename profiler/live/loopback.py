"""The only servers a live run attaches to: http(s) URLs whose host resolves to loopback alone.

The host is parsed from the URL (not matched as a prefix: ``http://127.0.0.1.invalid`` is
another host) and resolved locally; every address it resolves to must be loopback
(127.0.0.0/8 or ::1).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from simulator.records.errors import ConfigError

FIELD = "--url"
ALLOWED = "an http:// URL of a server on this machine (127.0.0.1, localhost or [::1]) with a port"


def _refuse(url: str, why: str) -> ConfigError:
    return ConfigError(FIELD, f"{why}; allowed: {ALLOWED}, got {url!r}")


def loopback_addresses(host: str) -> list[str]:
    """The addresses host resolves to (an IP literal resolves to itself, with no lookup)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({info[4][0].split("%", 1)[0] for info in infos})


def check_loopback_url(url: str) -> str:
    """url without a trailing slash if it names a loopback server; else ConfigError naming --url."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as err:
        raise _refuse(url, f"not a URL ({err})") from None
    if parts.scheme not in ("http", "https"):
        raise _refuse(url, f"scheme {parts.scheme or 'missing'!r} is not http or https")
    host = parts.hostname
    if not host:
        raise _refuse(url, "no host")
    if port is None:
        raise _refuse(url, "no port")
    if parts.username or parts.password:
        raise _refuse(url, "credentials in the URL")
    try:
        addresses = loopback_addresses(host)
    except (OSError, UnicodeError):
        raise _refuse(url, f"host {host!r} does not resolve") from None
    outside = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
    if not addresses or outside:
        raise _refuse(url, f"host {host!r} is not loopback (resolves to {', '.join(outside or ['nothing'])})")
    return url.strip().rstrip("/")
