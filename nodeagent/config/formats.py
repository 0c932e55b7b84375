"""String formats used by the config schema: each is a check (returns a problem text or None) plus,
where one exists, a regular expression that expresses the same rule for the published JSON Schema.

Messages never repeat a value that may hold a secret (URLs may carry ``user:password@``, header values
carry tokens); callers decide with ``Format.echo`` whether the value may be shown.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from nodeagent.util.endpoints import UNIX_SCHEME, split_host_port, unix_socket_path

# --- formats -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    name: str
    check: Callable[[str], str | None]
    pattern: str | None  # JSON Schema (ECMA-262 compatible) regex expressing the same rule, if any
    description: str
    echo: bool = True  # may the value be repeated in an error message?


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = rf"{_LABEL}(?:\.{_LABEL})*"
_DNS_RE = re.compile(rf"^{_DNS_NAME}$")
_IPV6_BRACKETED = r"\[[0-9A-Fa-f:.]+\]"


def _check_port(port: str, *, allow_zero: bool = False) -> str | None:
    if not port.isascii() or not port.isdigit():
        return "port must be a number"
    low = 0 if allow_zero else 1
    if not low <= int(port) <= 65535:
        return f"port must be between {low} and 65535"
    return None


def _check_host(host: str) -> str | None:
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "invalid IPv6 address"
        return None
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "invalid IPv4 address"
        return None
    if len(host) > 253 or not _DNS_RE.fullmatch(host):
        return "invalid host name"
    return None


def check_registry_host(name: str) -> str | None:
    """A key of ``containerd.mirrors``: ``_default`` or a registry host with an optional port.

    The key becomes a directory name under ``hostsDir``, so anything path-like is refused first.
    """
    if name == "_default":
        return None
    if not name:
        return "registry name must not be empty"
    if any(c in name for c in "/\\\x00") or ".." in name or name.startswith("."):
        return (
            "not a registry host: '/', '\\', '..', NUL and a leading '.' are not allowed "
            "(the name becomes a directory under hostsDir)"
        )
    hp = split_host_port(name)
    if hp is None:
        return "not a registry host (expected host, host:port, [IPv6]:port or _default)"
    host, port = hp
    if port is not None and (err := _check_port(port)):
        return f"not a registry host: {err}"
    if err := _check_host(host):
        return f"not a registry host: {err} (expected host, host:port, [IPv6]:port or _default)"
    return None


REGISTRY_HOST = Format(
    "registry-host",
    check_registry_host,
    rf"^(?:_default|(?:{_DNS_NAME}|{_IPV6_BRACKETED})(?::[0-9]{{1,5}})?)$",
    "a registry host as it appears in image names (`docker.io`, `registry.local:5000`, `[fd00::1]:5000`) "
    "or `_default` for every registry",
)


def check_http_url(url: str) -> str | None:
    from urllib.parse import urlsplit

    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "must be a URL without spaces or control characters"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "must be an http:// or https:// URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if "@" in parts.netloc:
        return "must not contain credentials (user:password@); use header or a credential provider"
    if not parts.hostname:
        return "URL has no host"
    hp = split_host_port(parts.netloc)
    if hp is None:
        return "URL has an invalid host or port"
    host, port = hp
    if port is not None and (err := _check_port(port)):
        return f"URL {err}"
    if err := _check_host(host):
        return f"URL has an {err}"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "URL must not have a query or fragment"
    return None


HTTP_URL = Format(
    "http-url",
    check_http_url,
    r"^https?://[^/?#@\s]+(?:/[^?#\s]*)?$",
    "an `http://` or `https://` URL with a host, optionally a path; no credentials, query or fragment",
    echo=False,
)


def check_abs_path(path: str) -> str | None:
    if "\x00" in path:
        return "path must not contain NUL"
    if not path.startswith("/"):
        return "must be an absolute path"
    if ".." in path.split("/"):
        return "path must not contain '..'"
    if len(path) > 4096:
        return "path is too long"
    return None


_ABS_PATH_PATTERN = r"^(?!.*(?:^|/)\.\.(?:/|$))/[^\u0000]*$"

ABS_PATH = Format("abs-path", check_abs_path, _ABS_PATH_PATTERN, "an absolute path without `..`")


def check_optional_abs_path(path: str) -> str | None:
    return None if path == "" else check_abs_path(path)


OPTIONAL_ABS_PATH = Format(
    "optional-abs-path",
    check_optional_abs_path,
    r"^$|" + _ABS_PATH_PATTERN,
    'an absolute path without `..`, or `""`',
)

_NODE_NAME = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
_NODE_NAME_RE = re.compile(rf"^{_NODE_NAME}$")


def check_optional_node_name(name: str) -> str | None:
    """A Kubernetes node name (a lower-case DNS subdomain, at most 253 characters) or ``""``."""
    if name == "" or (len(name) <= 253 and _NODE_NAME_RE.match(name)):
        return None
    return f"{name!r} is not a node name (lower-case DNS subdomain, at most 253 characters)"


OPTIONAL_NODE_NAME = Format(
    "optional-node-name",
    check_optional_node_name,
    rf"^$|^(?=.{{1,253}}$){_NODE_NAME}$",
    'a Kubernetes node name (lower-case DNS subdomain), or `""`',
)

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def check_socket_path(path: str) -> str | None:
    if path == "":
        return None
    if err := check_abs_path(path):
        return err
    if len(path.encode()) > SUN_PATH_MAX:
        return f"socket path is longer than {SUN_PATH_MAX} bytes (the unix socket limit)"
    return None


SOCKET_PATH = Format(
    "socket-path",
    check_socket_path,
    r"^$|" + _ABS_PATH_PATTERN,
    f'an absolute unix socket path without `..`, at most {SUN_PATH_MAX} bytes; `""` turns it off',
)


def check_unix_endpoint(endpoint: str) -> str | None:
    if not endpoint.startswith(UNIX_SCHEME):
        return "must be a unix socket endpoint: unix:///absolute/path"
    path = unix_socket_path(endpoint)
    if not path:
        return "must be a unix socket endpoint: unix:///absolute/path"
    return check_socket_path(path)


UNIX_ENDPOINT = Format(
    "unix-endpoint",
    check_unix_endpoint,
    r"^unix://(?!.*(?:^|/)\.\.(?:/|$))/[^\u0000]+$",
    "`unix:///absolute/path/to.sock`",
)


def check_listen(addr: str) -> str | None:
    hp = split_host_port(addr)
    if hp is None:
        return "must be host:port (for example 0.0.0.0:9847, 127.0.0.1:9847 or [::]:9847)"
    host, port = hp
    if port is None:
        return "must be host:port (for example 0.0.0.0:9847, 127.0.0.1:9847 or [::]:9847)"
    if err := _check_port(port, allow_zero=True):
        return err
    if host and (err := _check_host(host)):
        return err
    return None


LISTEN = Format(
    "listen-address",
    check_listen,
    rf"^(?:{_DNS_NAME}|{_IPV6_BRACKETED})?:[0-9]{{1,5}}$",
    "`host:port` to listen on (`0.0.0.0:9847`, `127.0.0.1:9847`, `[::]:9847`); port 0 picks a free port",
)

# distribution/reference grammar (github.com/distribution/reference, reference.go):
#   reference := name [":" tag] ["@" digest];  name := [domain "/"] path;  domain := host [":" port]
_ALNUM = r"[a-z0-9]+"
_SEP = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEP}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
IMAGE_REFERENCE_PATTERN = rf"^{_NAME}(?::{_TAG})?(?:@{_DIGEST})?$"
_REFERENCE_RE = re.compile(rf"^({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?$")
NAME_TOTAL_LENGTH_MAX = 255


def check_image_reference(ref: str) -> str | None:
    if not ref:
        return "image reference must not be empty"
    m = _REFERENCE_RE.fullmatch(ref)
    if m is None:
        if ref != ref.lower() and _REFERENCE_RE.fullmatch(ref.lower()):
            return "invalid image reference: repository name must be lowercase"
        return "invalid image reference (expected [registry/]repository[:tag][@digest])"
    if len(m.group(1)) > NAME_TOTAL_LENGTH_MAX:
        return f"invalid image reference: name is longer than {NAME_TOTAL_LENGTH_MAX} characters"
    return None


IMAGE_REFERENCE = Format(
    "image-reference",
    check_image_reference,
    IMAGE_REFERENCE_PATTERN,
    "an image reference `[registry/]repository[:tag][@digest]` (distribution reference grammar)",
)


_GLOB_CHARS = re.compile(r"^[A-Za-z0-9._\-/:@*?\[\]!]+$")


def check_glob(pattern: str) -> str | None:
    if not pattern:
        return "pattern must not be empty"
    if not _GLOB_CHARS.fullmatch(pattern):
        bad = next(c for c in pattern if not _GLOB_CHARS.fullmatch(c))
        return f"invalid pattern: character {bad!r} cannot appear in an image reference or glob"
    depth = 0
    for c in pattern:
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
    if depth:
        return "invalid pattern: unclosed '['"
    return None


GLOB = Format(
    "image-glob",
    check_glob,
    r"^[A-Za-z0-9._\-/:@*?\[\]!]+$",
    "a shell-style glob (`*`, `?`, `[...]`) matched against image references",
)

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_header_name(name: str) -> str | None:
    if not _TOKEN_RE.fullmatch(name):
        return "not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    return None


HEADER_NAME = Format(
    "header-name",
    check_header_name,
    r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$",
    "an HTTP header name",
)

_HEADER_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*$")


def check_header_value(value: str) -> str | None:
    if len(value) > 8192:
        return "header value is longer than 8192 characters (value not shown)"
    if not _HEADER_VALUE_RE.fullmatch(value):
        return "header value must be printable ASCII without line breaks (value not shown)"
    return None


HEADER_VALUE = Format(
    "header-value",
    check_header_value,
    r"^[\t\u0020-\u007e]*$",
    "an HTTP header value (printable ASCII); may hold a token, so it is never shown in messages",
    echo=False,
)
