"""Health probe of one registry mirror: one HTTP GET of its registry API base, bounded in time.

The request goes where containerd would send its first request to that host (see containerd's
``docs/hosts.md``, ``override_path``): for a normal mirror the API root is ``<endpoint path>/v2``
(``/v2`` appended unless the path already ends in it); for an ``overridePath`` mirror the endpoint's
path *is* the API root. We ask for ``<api root>/``, as a registry client's ping does.

An HTTP answer below 500 means alive (200, 404, redirects prove that something serves there),
except an authentication answer: 401/403 means the mirror cannot serve this node's pulls (wrong,
expired or missing credentials), unless a 401 carries a Bearer challenge whose realm hands out a
token for the same headers, as containerd would get one. No answer within ``timeout`` (connect +
TLS + the answer, token request included), a refused or reset connection, a TLS failure, or a 5xx
means dead. Only the status line (and, for 401/403, the headers) is read; never a body.

Stdlib only (asyncio streams + ssl), so ``apply`` can probe on the boot path without grpc or
prometheus_client. Header values from the config (which may hold credentials) are sent but never
appear in a result, log line or error.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import random
import re
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from nodeagent import __version__
from nodeagent.config.model import Mirror

Clock = Callable[[], float]

# Jitter spreads probes of many nodes (and many mirrors on one node) over time: each interval is
# drawn uniformly from interval * [1 - JITTER, 1 + JITTER].
JITTER = 0.1
_MAX_STATUS_LINE = 1024


def api_root(endpoint: str, override_path: bool) -> str:
    """The URL path containerd uses as this host's registry API root (no trailing slash)."""
    path = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}").path
    if path:
        path = posixpath.normpath(path)
        if path == "/":
            path = ""
        if not override_path and not path.endswith("/v2"):
            path = f"{path}/v2"
    elif not override_path:
        path = "/v2"
    return path


def probe_path(endpoint: str, override_path: bool) -> str:
    """The request path of a probe: the API root with a trailing slash (``/v2/``)."""
    return api_root(endpoint, override_path) + "/"


@dataclass(frozen=True)
class ProbeTarget:
    """Everything needed to probe one mirror of one registry; built once from the config."""

    registry: str
    endpoint: str  # as configured: the label value and the hosts.toml key
    scheme: str
    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold secrets
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    setup_error: str = ""  # e.g. an unreadable CA file: every probe fails with this

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _ssl_context(mirror: Mirror, resolve_ca: Callable[[str], Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if mirror.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    for ca in mirror.ca:
        ctx.load_verify_locations(cafile=str(resolve_ca(ca)))
    return ctx


def make_target(registry: str, mirror: Mirror, resolve_ca: Callable[[str], Path] = Path) -> ProbeTarget:
    """Build the probe of ``mirror``; ``resolve_ca`` maps a configured CA path to a file to read
    (callers pass one that goes through ``Paths`` and resolves relative paths as containerd does,
    against the registry's hosts directory)."""
    url = urlsplit(mirror.endpoint if "://" in mirror.endpoint else f"https://{mirror.endpoint}")
    scheme = url.scheme.lower()
    host = url.hostname or ""
    try:
        port = url.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = 0
    path = probe_path(mirror.endpoint, mirror.override_path)
    # A header value with CR/LF would split the request: never send it (the schema refuses it too).
    headers = tuple(
        (name, value)
        for name, values in mirror.header
        for value in values
        if not any(c in name + value for c in "\r\n")
    )
    error = ""
    ctx: ssl.SSLContext | None = None
    if scheme not in ("http", "https") or not host or not port:
        error = "not an http(s) URL with a host"
    elif scheme == "https":
        try:
            ctx = _ssl_context(mirror, resolve_ca)
        except (OSError, ssl.SSLError) as e:
            error = f"cannot load CA: {getattr(e, 'strerror', None) or e}"
    return ProbeTarget(registry, mirror.endpoint, scheme, host, port, path, headers, ctx, error)


@dataclass(frozen=True)
class ProbeResult:
    alive: bool
    duration: float  # seconds, from connect to status line (or failure)
    status: int | None = None  # HTTP status when one was read
    error: str = ""  # why it counts as dead: "timeout", "connection refused", "HTTP 503", ...
    auth_ok: bool | None = None  # False: the mirror refused the credentials (or wants some); None: unknown


_MAX_HEADER_BYTES = 16 * 1024
_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


def _request(target: ProbeTarget, path: str | None = None, host_header: str | None = None) -> bytes:
    lines = [
        f"GET {path or target.path} HTTP/1.1",
        f"Host: {host_header or target.host_header}",
        f"User-Agent: nodeagent/{__version__} (mirror health probe)",
        "Accept: */*",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in target.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _parse_status(line: bytes) -> int | None:
    parts = line.split(None, 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() and len(parts[1]) == 3:
        return int(parts[1])
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or type(e).__name__}"
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed before an HTTP answer"
    if isinstance(e, asyncio.LimitOverrunError):
        return "HTTP answer headers too large"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return type(e).__name__


def bearer_challenge(headers: list[tuple[str, str]]) -> dict[str, str] | None:
    """The parameters of a ``WWW-Authenticate: Bearer realm=...`` challenge, if there is one."""
    for name, value in headers:
        if name.lower() == "www-authenticate" and value[:7].lower() == "bearer ":
            params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                      for m in _PARAM.finditer(value[7:])}  # fmt: skip
            if params.get("realm"):
                return params
    return None


async def _exchange(
    target: ProbeTarget, host: str, port: int, ctx: ssl.SSLContext | None, request: bytes
) -> tuple[int | None, list[tuple[str, str]]]:
    """One request; the status and the response headers (never the body). Raises on I/O errors."""
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=host if ctx is not None else None, limit=_MAX_HEADER_BYTES
        )
        writer.write(request)
        await writer.drain()
        line = await reader.readuntil(b"\n")
        status = _parse_status(line[:_MAX_STATUS_LINE])
        headers: list[tuple[str, str]] = []
        if status is not None and status in (401, 403):
            # only an auth answer needs its headers (the challenge); bounded by the stream limit
            head = await reader.readuntil(b"\r\n\r\n") if not line.endswith(b"\r\n\r\n") else b""
            for raw in head.decode("latin-1").split("\r\n"):
                name, sep, value = raw.partition(":")
                if sep:
                    headers.append((name.strip(), value.strip()))
        return status, headers
    finally:
        if writer is not None:
            writer.close()
            # A TLS close_notify to a hung peer can block; the socket is closed either way.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.2):
                    await writer.wait_closed()


async def _token(target: ProbeTarget, challenge: dict[str, str]) -> int | None:
    """GET the Bearer realm with the mirror's headers, as containerd's authorizer does (the host's
    configured headers go to the realm too); its HTTP status."""
    realm = urlsplit(challenge["realm"])
    scheme = realm.scheme.lower()
    if scheme not in ("http", "https") or not realm.hostname:
        return None
    port = realm.port or (443 if scheme == "https" else 80)
    query = [(k, challenge[k]) for k in ("service", "scope") if challenge.get(k)]
    path = (realm.path or "/") + ("?" + urlencode(query) if query else "")
    ctx = None
    if scheme == "https":
        ctx = target.ssl_context if target.ssl_context is not None else ssl.create_default_context()
    host_header = realm.netloc.rpartition("@")[2]
    status, _ = await _exchange(
        target, realm.hostname, port, ctx, _request(target, path=path, host_header=host_header)
    )
    return status


async def probe(target: ProbeTarget, timeout_s: float, clock: Clock = time.monotonic) -> ProbeResult:
    """Probe ``target`` once; never raises (except cancellation), never takes much longer than
    ``timeout_s``.

    Authenticates as containerd will: the configured headers (with the mirror's credentials) go with
    the request; a 401 with a Bearer challenge is followed by a token request to the realm with the
    same headers. 401/403 otherwise means the mirror cannot serve a pull from this node: dead, with
    ``auth_ok`` False."""
    start = clock()
    if target.setup_error:
        return ProbeResult(False, 0.0, None, target.setup_error)
    try:
        async with asyncio.timeout(timeout_s):
            status, headers = await _exchange(
                target, target.host, target.port, target.ssl_context, _request(target)
            )
            token_status = None
            challenge = bearer_challenge(headers) if status == 401 else None
            if challenge is not None:
                token_status = await _token(target, challenge)
    except TimeoutError:
        return ProbeResult(False, clock() - start, None, f"timeout after {timeout_s:g}s")
    except (OSError, EOFError, ssl.SSLError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as e:
        return ProbeResult(False, clock() - start, None, _describe(e))
    duration = clock() - start
    if status is None:
        return ProbeResult(False, duration, None, "not an HTTP answer")
    if status >= 500:
        return ProbeResult(False, duration, status, f"HTTP {status}")
    sends_auth = any(name.lower() == "authorization" for name, _ in target.headers)
    if status == 401 and challenge is not None:
        if token_status == 200:
            return ProbeResult(True, duration, status, "", True)
        what = "refused the credentials" if sends_auth else "refused an anonymous token"
        return ProbeResult(
            False, duration, status, f"HTTP 401: token realm {what} (HTTP {token_status})", False
        )
    if status == 401:
        what = "credentials refused" if sends_auth else "authentication required (no credentials configured)"
        return ProbeResult(False, duration, status, f"HTTP 401: {what}", False)
    if status == 403:
        return ProbeResult(False, duration, status, "HTTP 403: access denied", False)
    return ProbeResult(True, duration, status, "", True)


def next_interval(interval: float, rng: random.Random | None = None, jitter: float = JITTER) -> float:
    """``interval`` with +/- ``jitter`` (fraction) of uniform random spread."""
    r = rng or random
    return interval * (1.0 + r.uniform(-jitter, jitter))


async def probe_all(targets: Iterable[ProbeTarget], timeout_s: float) -> list[ProbeResult]:
    """Probe every target once, all at the same time; bounded by about ``timeout_s``."""
    return list(await asyncio.gather(*(probe(t, timeout_s) for t in targets)))


def probe_all_once(targets: Iterable[ProbeTarget], timeout_s: float) -> list[ProbeResult]:
    """Synchronous ``probe_all`` for ``apply`` (which has no event loop of its own)."""
    return asyncio.run(probe_all(list(targets), timeout_s))
