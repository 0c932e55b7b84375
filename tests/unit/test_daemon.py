"""Daemon in-process against the FAKE runtime (tests/unit/cri/fakes.py): HTTP endpoints, status
file, workers, listeners, sd_notify over a real datagram socket, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent.config.model import Config, CriConfig, MetricsConfig
from nodeagent.cri.client import CriClient
from nodeagent.cri.gen import cri_api_pb2 as cri
from nodeagent.cri.gen import cri_api_pb2_grpc as cri_grpc
from nodeagent.proxy.records import PullRecord
from nodeagent.run.daemon import Daemon
from nodeagent.run.sd_daemon import sd_notify, watchdog_interval
from nodeagent.util.paths import Paths
from tests.unit.cri.fakes import fake_runtime
from tests.unit.proxy.helpers import rm, short_tmp


def make_config(endpoint: str, proxy_socket: str = "/run/nodeagent/cri.sock") -> Config:
    return Config(
        cri=CriConfig(endpoint=endpoint, proxy_socket=proxy_socket),
        metrics=MetricsConfig(listen="127.0.0.1:0"),
    )


async def http_get(url: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()

    return await asyncio.to_thread(get)


@asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.ensure_future(daemon.run())
    await asyncio.wait_for(daemon.ready.wait(), 10)
    try:
        yield task
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 20)


async def status_when(daemon: Daemon, done: Callable[[dict[str, Any]], bool], within: float = 10.0) -> Any:
    """The daemon's status file once ``done(status)`` holds, woken by each write of the file (the
    writer runs off the loop, in a thread); fails after ``within`` seconds without one."""
    written = threading.Event()
    write = daemon.status_writer._write

    def spy(body: str) -> None:
        write(body)
        written.set()

    daemon.status_writer._write = spy  # type: ignore[method-assign]
    try:
        async with asyncio.timeout(within):
            while True:
                st = json.loads(daemon.paths.daemon_status_file.read_text())
                if done(st):
                    return st
                await asyncio.to_thread(written.wait, 0.5)
                written.clear()
    finally:
        daemon.status_writer._write = write  # type: ignore[method-assign]


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET (a FAKE systemd)."""

    def __init__(self, d: str) -> None:
        self.path = os.path.join(d, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


def test_sd_notify_and_watchdog_env() -> None:
    d = short_tmp()
    n = NotifySocket(d)
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": n.path})
    assert n.messages() == ["READY=1"]
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": os.path.join(d, "gone.sock")})
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None or os.getpid() == 1
    assert watchdog_interval({"WATCHDOG_USEC": str(2_000_000), "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({}) is None
    n.sock.close()
    rm(d)


def test_sd_notify_never_blocks_when_systemd_does_not_read() -> None:
    d = short_tmp()
    n = NotifySocket(d)
    results = [sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": n.path}) for _ in range(5000)]
    assert results[0] is True
    assert results[-1] is False  # the queue filled up; the message was dropped, not waited on
    n.sock.close()
    rm(d)


def test_abstract_notify_socket() -> None:
    name = f"nodeagent-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    try:
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()


def test_daemon_serves_proxy_metrics_health_and_status_then_stops_cleanly() -> None:
    d = short_tmp()
    root = Path(d) / "root"
    notify = NotifySocket(d)

    async def main() -> None:
        async with fake_runtime() as (_rt, up):
            env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}
            daemon = Daemon(make_config(up), Paths(root), environ=env)
            seen: list[PullRecord] = []
            async_seen: list[str] = []

            async def async_listener(rec: PullRecord) -> None:
                async_seen.append(rec.image)

            daemon.add_pull_listener(seen.append)
            daemon.add_pull_listener(async_listener)
            daemon.add_status_hook("feature", lambda: {"hello": 1})
            daemon.add_status_hook("broken", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
            async with running(daemon) as task:
                assert "READY=1" in notify.messages()[0]
                sock = root / "run" / "nodeagent" / "cri.sock"
                assert sock.exists()
                base = f"http://{daemon.metrics_address}"
                code, text = await http_get(base + "/metrics")
                assert code == 200
                assert 'nodeagent_build_info{version="' in text
                assert "process_resident_memory_bytes" in text
                code, text = await http_get(base + "/healthz")
                assert (code, text.startswith("ok")) == (200, True)
                code, _ = await http_get(base + "/nope")
                assert code == 404
                async with CriClient("unix://" + str(sock)) as c:
                    await c.pull_image("reg.local/app:1")
                await daemon._proxy.drain_records()
                for _ in range(100):
                    if async_seen:
                        break
                    await asyncio.sleep(0.01)
                assert [r.image for r in seen] == ["reg.local/app:1"] and async_seen == ["reg.local/app:1"]
                # the status writer follows the change (debounced): the first file that has the pull
                st = await status_when(daemon, lambda s: s["pulls"]["totals"] == {"success": 1})
                assert st["state"] == "running" and st["pid"] == os.getpid()
                assert st["proxy"]["upstreamOk"] is True
                assert st["pulls"]["totals"] == {"success": 1}
                assert st["pulls"]["recent"][0]["image"] == "reg.local/app:1"
                assert st["sections"]["feature"]["hello"] == 1
                assert "ZeroDivisionError" in st["sections"]["broken"]["error"]
                assert st["metrics"]["listen"] == daemon.metrics_address
                assert "WATCHDOG=1" in notify.messages()
            assert task.result() == 0
            assert not sock.exists()
            st = json.loads(daemon.paths.daemon_status_file.read_text())
            assert st["state"] == "stopped"
            assert "STOPPING=1" in notify.messages()

    asyncio.run(main())
    notify.sock.close()
    rm(d)


def test_upstream_down_keeps_metrics_and_reports_unhealthy() -> None:
    d = short_tmp()

    async def main() -> None:
        daemon = Daemon(make_config("unix://" + os.path.join(d, "absent.sock")), Paths(Path(d) / "root"))
        async with running(daemon):
            base = f"http://{daemon.metrics_address}"
            code, text = await http_get(base + "/healthz")
            assert code == 503 and "not answering" in text
            code, text = await http_get(base + "/metrics")
            assert code == 200 and "nodeagent_cri_upstream_up 0.0" in text
            # the status file's judgement as a metric: set when the file is next written (<= 1 s debounce)
            want = 'nodeagent_degraded{component="upstream"} 1.0'
            for _ in range(100):
                if want in (await http_get(base + "/metrics"))[1]:
                    break
                await asyncio.sleep(0.05)
            assert want in (await http_get(base + "/metrics"))[1]

    asyncio.run(main())
    rm(d)


def test_degraded_gauge_follows_the_status_sections() -> None:
    d = short_tmp()
    section: dict[str, object] = {"degraded": False}

    async def main() -> None:
        async with fake_runtime() as (_rt, up):
            daemon = Daemon(make_config(up), Paths(Path(d) / "root"))
            daemon.add_status_hook("mirrorHealth", lambda: section)
            daemon.add_status_hook("eviction", lambda: {"error": "boom"})
            async with running(daemon):
                text = (await http_get(f"http://{daemon.metrics_address}/metrics"))[1]
                assert 'nodeagent_degraded{component="mirrorHealth"} 0.0' in text
                assert 'nodeagent_degraded{component="eviction"} 1.0' in text
                assert 'nodeagent_degraded{component="upstream"} 0.0' in text
                section["degraded"] = True
                daemon.status()
                text = (await http_get(f"http://{daemon.metrics_address}/metrics"))[1]
                assert 'nodeagent_degraded{component="mirrorHealth"} 1.0' in text

    asyncio.run(main())
    rm(d)


def test_sigterm_drains_and_exits_zero() -> None:
    d = short_tmp()

    async def main() -> None:
        async with fake_runtime() as (_rt, up):
            daemon = Daemon(make_config(up), Paths(Path(d) / "root"), drain_seconds=2.0)
            task = asyncio.ensure_future(daemon.run())
            await asyncio.wait_for(daemon.ready.wait(), 10)
            os.kill(os.getpid(), signal.SIGTERM)
            assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(main())
    rm(d)


def test_crashing_worker_is_restarted_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import nodeagent.run.daemon as dm

    monkeypatch.setattr(dm, "WORKER_BACKOFF", 0.01)
    d = short_tmp()
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    async def main() -> None:
        daemon = Daemon(make_config("unix:///nonexistent/x.sock", proxy_socket=""), Paths(Path(d) / "root"))
        daemon.add_worker("flaky", flaky)
        with pytest.raises(ValueError, match="already"):
            daemon.add_worker("flaky", flaky)
        async with running(daemon):
            for _ in range(300):
                if len(runs) >= 3:
                    break
                await asyncio.sleep(0.02)
            assert len(runs) == 3
            st = daemon.status()
            assert st.workers["flaky"].restarts == 2
            assert st.workers["flaky"].state == "running"
            assert "boom" in (st.workers["flaky"].last_error or "")
            assert st.proxy.socket == ""

    asyncio.run(main())
    rm(d)


def test_sigterm_lets_in_flight_pulls_finish_within_the_drain_bound() -> None:
    from nodeagent.cri.client import RetryPolicy
    from tests.unit.cri.fakes import Plan

    d = short_tmp()

    async def main() -> None:
        async with fake_runtime() as (rt, up):
            daemon = Daemon(make_config(up), Paths(Path(d) / "root"), drain_seconds=3.0)
            sock = "unix://" + str(Path(d) / "root/run/nodeagent/cri.sock")
            async with running(daemon) as task:
                rt.plans["PullImage"] = Plan(delay=0.5)
                async with CriClient(sock, retry=RetryPolicy(attempts=1)) as c:
                    pull = asyncio.ensure_future(c.pull_image("reg.local/short:1"))
                    for _ in range(500):
                        if rt.calls("PullImage"):
                            break
                        await asyncio.sleep(0.01)
                    daemon.stop()
                    assert await pull == "sha256:" + "a" * 64  # finished, not cut off
                    assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(main())
    rm(d)


def test_sigterm_drain_is_bounded() -> None:
    from nodeagent.cri.client import CriError, RetryPolicy
    from tests.unit.cri.fakes import Plan

    d = short_tmp()

    async def main() -> None:
        async with fake_runtime() as (rt, up):
            daemon = Daemon(make_config(up), Paths(Path(d) / "root"), drain_seconds=0.3)
            sock = "unix://" + str(Path(d) / "root/run/nodeagent/cri.sock")
            task = asyncio.ensure_future(daemon.run())
            await asyncio.wait_for(daemon.ready.wait(), 10)
            rt.plans["PullImage"] = Plan(delay=60.0)
            async with CriClient(sock, retry=RetryPolicy(attempts=1)) as c:
                pull = asyncio.ensure_future(c.pull_image("reg.local/endless:1"))
                for _ in range(500):
                    if rt.calls("PullImage"):
                        break
                    await asyncio.sleep(0.01)
                daemon.stop()
                assert await asyncio.wait_for(task, 10) == 0  # did not wait for the 60 s pull
                with pytest.raises(CriError):
                    await pull
            for _ in range(100):
                if rt.cancelled:
                    break
                await asyncio.sleep(0.02)
            assert rt.cancelled == ["PullImage"]  # and the upstream pull was cancelled, not orphaned

    asyncio.run(main())
    rm(d)


# --- socket activation (a FAKE systemd: the test holds the listening socket and passes a copy) ---
class PassedSocket:
    """What systemd's nodeagent.socket does: bind and listen on ``path``, keep it open, and hand a
    copy to each daemon through LISTEN_FDS. The copy is at a free fd rather than 3 (pytest holds
    fd 3): ``SD_LISTEN_FDS_START`` is pointed at it; test_sd_daemon.py covers fd 3 itself."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)

    def environ(self, monkeypatch: pytest.MonkeyPatch, name: str = "cri-proxy") -> dict[str, str]:
        import nodeagent.run.sd_daemon as sdd

        fd = os.dup(self.sock.fileno())  # the daemon's copy; the daemon closes it at stop
        monkeypatch.setattr(sdd, "SD_LISTEN_FDS_START", fd)
        return {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": name}

    def close(self) -> None:
        self.sock.close()


def test_socket_activation_serves_the_passed_socket_and_never_removes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nodeagent.cri.client import RetryPolicy

    d = short_tmp()
    root = Path(d) / "root"
    held = PassedSocket(root / "run/nodeagent/cri.sock")
    endpoint = "unix://" + str(held.path)

    async def main() -> None:
        async with fake_runtime() as (_rt, up):
            for round_ in range(2):
                environ = held.environ(monkeypatch)
                daemon = Daemon(make_config(up), Paths(root), environ=environ)
                async with running(daemon):
                    assert environ == {}  # consumed: children of the daemon never see them
                    assert daemon.status().proxy.socket_inherited is True
                    async with CriClient(endpoint, retry=RetryPolicy(attempts=1)) as c:
                        assert (await c.image_status("reg.local/a:1")).HasField("image") is False
                assert held.path.exists(), f"round {round_}: the daemon removed systemd's socket"
                status = json.loads(daemon.paths.daemon_status_file.read_text())
                assert status["proxy"]["socketInherited"] is True

            # No daemon now: a call made meanwhile waits in the backlog and is answered by the next.
            # A channel with grpc's defaults, as the kubelet's (20 s to connect, SETTINGS included).
            async with grpc.aio.insecure_channel(endpoint) as ch:
                stub = cri_grpc.ImageServiceStub(ch)
                req = cri.ImageStatusRequest(image=cri.ImageSpec(image="reg.local/a:1"))
                waiting = asyncio.ensure_future(stub.ImageStatus(req, timeout=15))
                await asyncio.sleep(1.0)
                assert not waiting.done()
                daemon = Daemon(make_config(up), Paths(root), environ=held.environ(monkeypatch))
                async with running(daemon):
                    answer = await asyncio.wait_for(waiting, 10)
                    assert not answer.HasField("image")

    try:
        asyncio.run(main())
    finally:
        held.close()
        rm(d)


def test_started_by_hand_binds_and_removes_its_own_socket() -> None:
    d = short_tmp()
    root = Path(d) / "root"

    async def main() -> None:
        async with fake_runtime() as (_rt, up):
            environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}  # inherited from a parent, not for us
            daemon = Daemon(make_config(up), Paths(root), environ=environ)
            async with running(daemon):
                assert environ == {} and daemon.status().proxy.socket_inherited is False
                assert (root / "run/nodeagent/cri.sock").exists()
            assert not (root / "run/nodeagent/cri.sock").exists()

    asyncio.run(main())
    rm(d)


def test_passed_socket_at_another_path_is_reported_and_the_configured_path_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.unit.proxy.helpers import captured_log, log_events

    d = short_tmp()
    root = Path(d) / "root"
    held = PassedSocket(Path(d) / "elsewhere/cri.sock")

    async def main() -> None:
        async with fake_runtime() as (_rt, up):
            daemon = Daemon(make_config(up), Paths(root), environ=held.environ(monkeypatch))
            with captured_log() as buf:
                async with running(daemon):
                    assert daemon.status().proxy.socket_inherited is False
                    async with CriClient("unix://" + str(root / "run/nodeagent/cri.sock")) as c:
                        await c.image_status("reg.local/a:1")
            (warning,) = [e for e in log_events(buf) if "is not cri.proxySocket" in e["msg"]]
            assert warning["level"] == "warning"
            assert warning["inherited_socket"] == str(held.path)
            assert warning["proxy_socket"] == str(root / "run/nodeagent/cri.sock")
            assert "ListenStream=" in warning["msg"]
            assert held.path.exists()  # systemd's socket is left alone

    try:
        asyncio.run(main())
    finally:
        held.close()
        rm(d)


def test_passed_socket_with_the_proxy_off_is_left_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cri.proxySocket: ""` (the kubelet pointed straight at containerd) while nodeagent.socket is
    still there: the daemon starts, serves metrics, and says what to do with the socket unit."""
    from tests.unit.proxy.helpers import captured_log, log_events

    d = short_tmp()
    held = PassedSocket(Path(d) / "root/run/nodeagent/cri.sock")

    async def main() -> None:
        daemon = Daemon(
            make_config("unix:///nonexistent/x.sock", proxy_socket=""),
            Paths(Path(d) / "root"),
            environ=held.environ(monkeypatch),
        )
        with captured_log() as buf:
            async with running(daemon):
                st = daemon.status().proxy
                assert (st.socket, st.socket_inherited) == ("", False)
                code, _ = await http_get(f"http://{daemon.metrics_address}/metrics")
                assert code == 200
        (warning,) = [e for e in log_events(buf) if "left unused" in e["msg"]]
        assert "systemctl mask --now nodeagent.socket" in warning["msg"] and warning[
            "inherited_socket"
        ] == str(held.path)

    try:
        asyncio.run(main())
    finally:
        held.close()
        rm(d)


def test_a_passed_socket_of_the_wrong_kind_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeagent.run.sd_daemon import ListenFdsError

    d = short_tmp()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(os.path.join(d, "dgram.sock"))

    async def main() -> None:
        import nodeagent.run.sd_daemon as sdd

        monkeypatch.setattr(sdd, "SD_LISTEN_FDS_START", dgram.fileno())
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        daemon = Daemon(make_config("unix:///nonexistent/x.sock"), Paths(Path(d) / "root"), environ=environ)
        with pytest.raises(ListenFdsError, match="SOCK_DGRAM, not listening; the proxy needs a listening"):
            await daemon.run()
        assert not (Path(d) / "root/run/nodeagent/cri.sock").exists()  # nothing bound instead

    try:
        asyncio.run(main())
    finally:
        dgram.close()
        rm(d)
