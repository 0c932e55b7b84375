"""Probe semantics against in-process loopback servers (no subprocess, no files)."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable

import pytest

from nodeagent.config.model import Mirror
from nodeagent.mirrorhealth import probe as p
from tests.sandbox.net import RefusedPort


@pytest.mark.parametrize(
    ("endpoint", "override", "expected"),
    [
        ("http://mirror:5000", False, "/v2/"),
        ("https://mirror", False, "/v2/"),
        ("https://mirror/", False, "/v2/"),
        ("https://mirror/v2", False, "/v2/"),
        ("https://ecr.example/v2/docker-hub", False, "/v2/docker-hub/v2/"),
        # overridePath: the endpoint path is the API root, no /v2 added (containerd docs/hosts.md)
        ("https://ecr.example/v2/docker-hub", True, "/v2/docker-hub/"),
        ("https://mirror", True, "/"),
        ("https://mirror/a//b/../c/", True, "/a/c/"),
    ],
)
def test_probe_path_follows_containerd_api_root_rules(endpoint: str, override: bool, expected: str) -> None:
    assert p.probe_path(endpoint, override) == expected


def test_target_host_port_and_host_header() -> None:
    t = p.make_target("docker.io", Mirror("http://127.0.0.1:5000"))
    assert (t.scheme, t.host, t.port, t.path, t.host_header) == (
        "http",
        "127.0.0.1",
        5000,
        "/v2/",
        "127.0.0.1:5000",
    )
    t = p.make_target("docker.io", Mirror("https://[::1]/x", override_path=True))
    assert (t.port, t.path, t.host_header) == (443, "/x/", "[::1]")
    assert t.ssl_context is not None and t.ssl_context.verify_mode == ssl.CERT_REQUIRED


def test_skip_verify_disables_certificate_checks() -> None:
    t = p.make_target("r", Mirror("https://m", skip_verify=True))
    assert t.ssl_context is not None
    assert t.ssl_context.verify_mode == ssl.CERT_NONE and not t.ssl_context.check_hostname


def test_unreadable_ca_makes_every_probe_fail_with_a_clear_reason(tmp_path: object) -> None:
    t = p.make_target("r", Mirror("https://m", ca=("/nonexistent/ca.pem",)))
    assert t.setup_error.startswith("cannot load CA")
    r = asyncio.run(p.probe(t, 1.0))
    assert not r.alive and r.error == t.setup_error


def test_header_values_with_newlines_are_never_sent_and_secrets_not_in_repr() -> None:
    m = Mirror("http://m", header=(("Authorization", ("Bearer s3cret",)), ("X-Bad", ("a\r\nHost: evil",))))
    t = p.make_target("r", m)
    assert t.headers == (("Authorization", "Bearer s3cret"),)
    assert "s3cret" not in repr(t)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _serve_and_probe(
    handler: Handler, timeout: float = 0.5, path_check: list[bytes] | None = None
) -> p.ProbeResult:
    async def main() -> p.ProbeResult:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await p.probe(p.make_target("r", Mirror(f"http://127.0.0.1:{port}")), timeout)
        finally:
            server.close()

    return asyncio.run(main())


def _answer(status_line: bytes, seen: list[bytes] | None = None) -> Handler:
    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(req)
        writer.write(status_line + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    return h


@pytest.mark.parametrize("status", [200, 404, 301])
def test_any_http_answer_below_500_but_auth_is_alive(status: int) -> None:
    seen: list[bytes] = []
    r = _serve_and_probe(_answer(f"HTTP/1.1 {status} X".encode(), seen))
    assert r.alive and r.status == status and r.error == ""
    assert seen[0].startswith(b"GET /v2/ HTTP/1.1\r\n") and b"Connection: close" in seen[0]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_dead(status: int) -> None:
    r = _serve_and_probe(_answer(f"HTTP/1.1 {status} Oops".encode()))
    assert not r.alive and r.status == status and r.error == f"HTTP {status}"


def test_garbage_answer_is_dead() -> None:
    r = _serve_and_probe(_answer(b"SSH-2.0-OpenSSH_9.2"))
    assert not r.alive and r.error == "not an HTTP answer"


def test_hung_server_that_accepts_and_never_answers_is_dead_within_the_timeout() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    r = _serve_and_probe(hang, timeout=0.3)
    assert not r.alive and r.error == "timeout after 0.3s"  # (probe times: bench/bench_mirrorhealth.py)
    assert r.duration >= 0.25  # the probe's own measure covers the wait


def test_server_that_closes_without_answering_is_dead() -> None:
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    r = _serve_and_probe(close)
    assert not r.alive and r.error == "connection closed before an HTTP answer"


def test_refused_port_is_dead() -> None:
    with RefusedPort() as refused:  # bound, never listening
        r = asyncio.run(p.probe(p.make_target("r", Mirror(refused.url)), 1.0))
    assert not r.alive and r.error == "connection refused"


def test_probe_all_runs_in_parallel_bounded_by_one_timeout() -> None:
    waiting = 0
    most = 0

    async def main() -> list[p.ProbeResult]:
        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal waiting, most
            waiting += 1
            most = max(most, waiting)
            await asyncio.sleep(30)

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            targets = [p.make_target("r", Mirror(f"http://127.0.0.1:{port}/{i}")) for i in range(5)]
            return await p.probe_all(targets, 0.3)
        finally:
            server.close()

    results = asyncio.run(main())
    assert len(results) == 5 and not any(r.alive for r in results)
    assert {r.error for r in results} == {"timeout after 0.3s"}
    assert most == 5  # all five waited at once: one timeout for all, not five in a row


def test_next_interval_stays_within_jitter_bounds() -> None:
    rng = random.Random(7)
    values = [p.next_interval(2.0, rng) for _ in range(1000)]
    assert min(values) >= 1.8 and max(values) <= 2.2
    assert max(values) - min(values) > 0.3  # actually spread, not constant


def _auth_registry(
    token_ok: bool,
    seen: list[bytes],
    challenge: str | None = 'Bearer realm="http://127.0.0.1:{port}/token",service="reg"',
) -> Handler:
    """/v2/ answers 401 with ``challenge``; /token answers 200 (or 401) to any request."""

    async def h(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await reader.readuntil(b"\r\n\r\n")
        seen.append(req)
        port = writer.get_extra_info("sockname")[1]
        if req.startswith(b"GET /token"):
            writer.write(b"HTTP/1.1 200 OK\r\n" if token_ok else b"HTTP/1.1 401 No\r\n")
            writer.write(b"Content-Length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 401 Unauthorized\r\n")
            if challenge is not None:
                writer.write(f"WWW-Authenticate: {challenge.format(port=port)}\r\n".encode())
            writer.write(b"Content-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    return h


def _probe_with(handler: Handler, header: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> p.ProbeResult:
    async def main() -> p.ProbeResult:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await p.probe(p.make_target("r", Mirror(f"http://127.0.0.1:{port}", header=header)), 1.0)
        finally:
            server.close()

    return asyncio.run(main())


def test_401_with_a_bearer_challenge_is_alive_when_the_realm_gives_a_token_for_the_same_headers() -> None:
    seen: list[bytes] = []
    r = _probe_with(_auth_registry(True, seen), (("Authorization", ("Basic Y2FuYXJ5OnRvaw==",)),))
    assert r.alive and r.auth_ok is True and r.status == 401
    # the token request carries service and the mirror's Authorization, as containerd's authorizer sends it
    assert seen[1].startswith(b"GET /token?service=reg HTTP/1.1\r\n")
    assert b"Authorization: Basic Y2FuYXJ5OnRvaw==" in seen[1]


def test_401_when_the_realm_refuses_is_an_auth_failure_and_names_no_secret() -> None:
    seen: list[bytes] = []
    r = _probe_with(_auth_registry(False, seen), (("Authorization", ("Basic Y2FuYXJ5OnRvaw==",)),))
    assert not r.alive and r.auth_ok is False
    assert r.error == "HTTP 401: token realm refused the credentials (HTTP 401)"
    assert "Y2FuYXJ5" not in repr(r)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ((("Authorization", ("Basic eDp5",)),), "HTTP 401: credentials refused"),
        ((), "HTTP 401: authentication required (no credentials configured)"),
    ],
)
def test_401_with_basic_or_no_challenge_means_the_mirror_cannot_serve_this_node(
    header: tuple[tuple[str, tuple[str, ...]], ...], error: str
) -> None:
    # an ECR pull-through cache answers an anonymous client like this: containerd would skip it
    r = _probe_with(_auth_registry(True, [], 'Basic realm="https://ecr"'), header)
    assert not r.alive and r.auth_ok is False and r.status == 401 and r.error == error
    r = _probe_with(_auth_registry(True, [], None), header)
    assert not r.alive and r.auth_ok is False and r.error == error


def test_403_is_an_auth_failure() -> None:
    r = _serve_and_probe(_answer(b"HTTP/1.1 403 Forbidden"))
    assert not r.alive and r.auth_ok is False and r.error == "HTTP 403: access denied"
