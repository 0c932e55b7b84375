"""gRPC over HTTP/2 on the wire: status and timeout headers, length-prefixed messages, the
request headers we send and how HTTP/2 resets map to gRPC codes (no I/O here)."""

from __future__ import annotations

import functools
import math
import zlib
from urllib.parse import quote, unquote

import grpc
from h2.errors import ErrorCodes

_CODES = {c.value[0]: c for c in grpc.StatusCode}
OK = grpc.StatusCode.OK
# Metadata that belongs to one hop (HTTP/2 and gRPC framing) and is never copied to the next.
_HOP = frozenset({b"content-type", b"te", b"user-agent", b"host", b"connection"})
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_MAX_STREAM_ID = 2**31 - 1
_MAX_WINDOW = 2**31 - 1


class RpcError(Exception):
    """A call ended with a non-OK status (the upstream's, or UNAVAILABLE when it cannot be reached)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# --- gRPC wire helpers -------------------------------------------------------------------------
def message_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def encode_timeout(seconds: float) -> bytes:
    """``grpc-timeout``: at most 8 digits and a unit; rounded up (never shortens the deadline)."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        v = math.ceil(max(seconds, 0.0) * scale)
        if v < 100_000_000:
            return str(max(v, 1)).encode() + unit
    return b"99999999H"


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def decode_timeout(value: bytes) -> float | None:
    if not 2 <= len(value) <= 9:
        return None
    try:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1:]]
    except (ValueError, KeyError):
        return None


def encode_message(details: str) -> bytes:
    """``grpc-message`` is percent-encoded UTF-8 (gRPC over HTTP/2)."""
    return quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()


def decode_message(value: bytes) -> str:
    return unquote(value.decode("ascii", "replace"), errors="replace")


def status_headers(code: grpc.StatusCode, details: str) -> list[tuple[bytes, bytes]]:
    out = [(b"grpc-status", str(code.value[0]).encode())]
    if details:
        out.append((b"grpc-message", encode_message(details)))
    return out


_OK_TRAILERS = status_headers(OK, "")


def status_of(headers: list[tuple[bytes, bytes]]) -> tuple[grpc.StatusCode, str] | None:
    code: grpc.StatusCode | None = None
    details = ""
    for k, v in headers:
        if k == b"grpc-status":
            try:
                code = _CODES.get(int(v), grpc.StatusCode.UNKNOWN)
            except ValueError:
                code = grpc.StatusCode.UNKNOWN
        elif k == b"grpc-message":
            details = decode_message(v)
    return None if code is None else (code, details)


def whole_message(data: bytes, limit: int) -> bytes | None:
    """The message if ``data`` is exactly one uncompressed gRPC message within ``limit`` (the usual
    case: a unary call's message in one DATA frame), else None."""
    if len(data) >= 5 and not data[0] and int.from_bytes(data[1:5], "big") == len(data) - 5 <= limit:
        return data[5:]
    return None


class MessageReader:
    """Cuts length-prefixed gRPC messages out of DATA frames; a message larger than ``limit`` is
    refused as soon as its length prefix is seen (nothing of it is held)."""

    __slots__ = ("buf", "encoding", "limit")

    def __init__(self, limit: int, encoding: bytes | None = None) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.encoding = encoding

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        if not buf:
            msg = whole_message(data, self.limit)
            if msg is not None:
                return [msg]
        buf += data
        out: list[bytes] = []
        while len(buf) >= 5:
            size = int.from_bytes(buf[1:5], "big")
            if size > self.limit:
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"message of {size} bytes is larger than the limit of {self.limit}",
                )
            if len(buf) < 5 + size:
                break
            with memoryview(buf) as view:
                msg = bytes(view[5 : 5 + size])
            if buf[0]:
                msg = self._decompress(msg)
            out.append(msg)
            del buf[: 5 + size]
        return out

    def _decompress(self, msg: bytes) -> bytes:
        if self.encoding in (b"gzip", b"deflate"):
            try:
                d = zlib.decompressobj(31 if self.encoding == b"gzip" else 15)
                out = d.decompress(msg, self.limit + 1)
            except zlib.error as e:
                raise RpcError(grpc.StatusCode.INTERNAL, f"bad compressed message: {e}") from None
            if len(out) > self.limit:
                raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "decompressed message too large")
            return out
        raise RpcError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"compression {(self.encoding or b'(none)').decode(errors='replace')} is not supported",
        )


@functools.lru_cache(maxsize=256)
def _request_headers(method: str) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", method.encode()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    )


def _reset_code(code: int) -> grpc.StatusCode:
    if code == ErrorCodes.REFUSED_STREAM:
        return grpc.StatusCode.UNAVAILABLE
    if code == ErrorCodes.CANCEL:
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def _http_code(status: bytes) -> grpc.StatusCode:
    return {
        b"400": grpc.StatusCode.INTERNAL,
        b"401": grpc.StatusCode.UNAUTHENTICATED,
        b"403": grpc.StatusCode.PERMISSION_DENIED,
        b"404": grpc.StatusCode.UNIMPLEMENTED,
        b"429": grpc.StatusCode.UNAVAILABLE,
        b"502": grpc.StatusCode.UNAVAILABLE,
        b"503": grpc.StatusCode.UNAVAILABLE,
        b"504": grpc.StatusCode.UNAVAILABLE,
    }.get(status, grpc.StatusCode.UNKNOWN)


def parse_endpoint(endpoint: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:///p``, ``unix:p`` and ``/p`` are unix sockets; ``host:port`` is TCP."""
    if endpoint.startswith("unix://"):
        return "unix", endpoint[len("unix://") :]
    if endpoint.startswith("unix:"):
        return "unix", endpoint[len("unix:") :]
    if endpoint.startswith("/"):
        return "unix", endpoint
    host, _, port = endpoint.rpartition(":")
    return "tcp", (host.strip("[]") or "localhost", int(port))
