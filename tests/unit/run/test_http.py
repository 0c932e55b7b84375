"""/metrics and /healthz on prometheus-client's server: paths, methods, the health check on the
daemon's loop, and the bounds (connections at once, idle clients)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from nodeagent.run import http
from nodeagent.run.http import MetricsEndpoint, parse_listen
from nodeagent.run.metrics import Metrics


async def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    def go() -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return int(r.status), dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return int(e.code), dict(e.headers), e.read()

    return await asyncio.to_thread(go)


@asynccontextmanager
async def serving(health: http.Health) -> AsyncIterator[str]:
    ep = MetricsEndpoint("127.0.0.1:0", Metrics(), health)
    await ep.start()
    try:
        yield f"http://{ep.address}"
    finally:
        await ep.stop()


async def answering(max_age: float) -> tuple[bool, str]:
    return True, ""


def test_paths_and_methods() -> None:
    async def main() -> None:
        async with serving(answering) as base:
            code, headers, body = await fetch(base + "/metrics")
            assert code == 200 and b'nodeagent_build_info{version="' in body
            assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert int(headers["Content-Length"]) == len(body)
            code, headers, body = await fetch(base + "/metrics", "HEAD")
            assert (code, body) == (200, b"") and int(headers["Content-Length"]) > 1000
            code, headers, body = await fetch(base + "/metrics", headers={"Accept-Encoding": "gzip"})
            assert headers.get("Content-Encoding") == "gzip" and b"nodeagent_" in gzip.decompress(body)
            om = {"Accept": "application/openmetrics-text; version=1.0.0"}
            code, headers, body = await fetch(base + "/metrics", headers=om)
            assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(
                b"# EOF\n"
            )
            code, _, body = await fetch(base + "/healthz")
            assert (code, body) == (200, b"ok: upstream CRI answers\n")
            assert (await fetch(base + "/"))[2] == b"nodeagent: /metrics /healthz\n"
            assert (await fetch(base + "/nope"))[0] == 404
            assert (await fetch(base + "/metrics", "POST"))[0] == 405

    asyncio.run(main())


def test_healthz_asks_the_daemon_loop_and_says_why_not() -> None:
    asked: list[float] = []

    async def down(max_age: float) -> tuple[bool, str]:
        asked.append(max_age)
        return False, "unix:///run/containerd/containerd.sock: UNAVAILABLE"

    async def main() -> None:
        async with serving(down) as base:
            code, _, body = await fetch(base + "/healthz")
            assert code == 503
            assert (
                body == b"upstream CRI not answering: unix:///run/containerd/containerd.sock: UNAVAILABLE\n"
            )
            assert (await fetch(base + "/healthz", "HEAD"))[0] == 503
            assert (await fetch(base + "/metrics"))[0] == 200  # metrics go on

    asyncio.run(main())
    assert asked == [http.HEALTHZ_CACHE_SECONDS] * 2  # a flood of checks reuses a recent answer


def test_a_check_that_does_not_finish_is_a_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "HEALTHZ_TIMEOUT", 0.3)
    cancelled: list[bool] = []

    async def hung(max_age: float) -> tuple[bool, str]:
        try:
            await asyncio.Event().wait()  # a wedged check (or a loop too busy to run it)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return True, ""

    async def main() -> None:
        async with serving(hung) as base:
            code, _, body = await fetch(base + "/healthz")
            assert code == 503 and b"no answer from the daemon's event loop within 0.3s" in body
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert cancelled == [True]  # not left running


def test_connections_are_bounded_and_idle_ones_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(http._Handler, "timeout", 0.5)

    async def main() -> None:
        async with serving(answering) as base:
            host, port = base.removeprefix("http://").rsplit(":", 1)
            idle = [socket.create_connection((host, int(port))) for _ in range(3)]  # send nothing
            try:
                await asyncio.sleep(0.1)
                extra = socket.create_connection((host, int(port)))
                extra.settimeout(2)
                extra.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await asyncio.to_thread(extra.recv, 100) == b""  # over the bound: closed at once
                extra.close()
                for s in idle:  # the idle clients are dropped after the read timeout
                    s.settimeout(3)
                    assert await asyncio.to_thread(s.recv, 100) == b""
                code, _, _ = await fetch(base + "/metrics")
                assert code == 200  # and the slots are free again
            finally:
                for s in idle:
                    s.close()

    asyncio.run(main())


def test_an_address_in_use_stops_the_start() -> None:
    async def main() -> None:
        async with serving(answering) as base:
            other = MetricsEndpoint(base.removeprefix("http://"), Metrics(), answering)
            with pytest.raises(OSError):
                await other.start()

    asyncio.run(main())


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9847") == ("0.0.0.0", 9847)
    assert parse_listen(":9847") == ("0.0.0.0", 9847)
    assert parse_listen("[::1]:9") == ("::1", 9)
    with pytest.raises(ValueError, match=r"metrics\.listen"):
        parse_listen("nohost")


def test_binding_does_no_reverse_dns_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard library's HTTP server looks its address up (getfqdn) when it binds; on a node
    whose DNS is not up yet that holds the start for seconds."""

    def no_dns(name: str = "") -> str:
        raise AssertionError(f"reverse lookup of {name!r}")

    monkeypatch.setattr(socket, "getfqdn", no_dns)

    async def main() -> None:
        async with serving(answering) as base:
            assert (await fetch(base + "/metrics"))[0] == 200

    asyncio.run(main())
