"""Endpoints and addresses, parsed one way: ``host[:port]`` splitting, listen addresses, URL
spelling (scheme, trailing slash) and ``unix://`` socket endpoints.

The config's formats (``nodeagent.config.formats``) validate with these; everything that later
splits, compares or connects to an endpoint uses the same functions, so a value that validated is
read the same way everywhere.
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
UNIX_SCHEME = "unix://"


def split_host_port(text: str) -> tuple[str, str | None] | None:
    """``host[:port]`` or ``[v6][:port]`` -> ``(host, port or None)``; None when malformed (more than
    one ``:`` outside brackets, text after ``]`` that is not ``:port``). The port is not checked."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            return None
        return host, rest[1:]
    if text.count(":") > 1:
        return None
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def listen_address(listen: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all addresses) -> ``(host, port)`` to bind;
    ``ValueError`` when it is not one of those."""
    host, port = split_host_port(listen) or ("", None)
    if port is None or not port.isascii() or not port.isdigit():
        raise ValueError(f"{listen!r} is not host:port")
    return host.strip("[]") or default_host, int(port)


def strip_scheme(url: str) -> str:
    """``https://host/path`` -> ``host/path`` (any scheme; text without one is returned stripped)."""
    return _SCHEME.sub("", url.strip())


def without_trailing_slash(url: str) -> str:
    """The spelling endpoints are compared and keyed by: ``https://m.example/`` == ``https://m.example``."""
    return url.rstrip("/")


def unix_socket_path(endpoint: str) -> str:
    """``unix:///run/x.sock`` -> ``/run/x.sock``; a bare path is returned as is."""
    return endpoint.removeprefix(UNIX_SCHEME)


def unix_endpoint(path: str) -> str:
    """``/run/x.sock`` -> ``unix:///run/x.sock``; an endpoint that already has the scheme is kept."""
    return path if path.startswith(UNIX_SCHEME) else UNIX_SCHEME + path
