"""``nodeagent run`` (a real process) proxying a real containerd, pulling from real registries.

What users rely on: every pull through the proxy shows up on /metrics with the right registry,
result, count, duration and bytes, and as one JSON log line; the scrape is valid for promtool and
a real Prometheus server; credentials never leak; containerd going away gives fast UNAVAILABLE
and recovery without restarting nodeagent; a crashed nodeagent restarts on its stale socket and a
retried pull completes with an intact image.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.cri.client import CriClient, CriError, RetryPolicy
from nodeagent.util import humanize
from tests.sandbox import Containerd, NodeAgent, PushedImage, Registry, Sandbox, free_port
from tests.sandbox.process import Daemon, wait_until

NO_RETRY = RetryPolicy(attempts=1)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def wait_for_pull_lines(agent: NodeAgent, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The per-pull record is finished right after the reply (size lookup): wait for n lines."""
    lines: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal lines
        lines = [line for line in agent.log_lines() if line.get("msg") == "pull"]
        return len(lines) >= n

    wait_until(f"{n} pull log lines", enough, timeout)
    return lines


@pytest.fixture
def two_registries(sandbox: Sandbox) -> tuple[Registry, Registry, Containerd]:
    plain = sandbox.registry()
    private = sandbox.registry(auth=("puller", "canary-pw-5b1f0c7e"))
    node = sandbox.containerd([plain, private])
    return plain, private, node


@pytest.mark.containerd_smoke
def test_pull_results_counts_durations_and_bytes(sandbox: Sandbox, two_registries: Any) -> None:
    plain, private, node = two_registries
    img = sandbox.image(plain, "apps/web", layers=2, layer_size=512 << 10)
    secret_img = sandbox.image(private, "apps/secret", layers=1, layer_size=128 << 10)
    agent = sandbox.nodeagent(node)

    async def body() -> tuple[int, int]:
        async with CriClient(agent.proxy_endpoint, retry=NO_RETRY) as cri:
            ref = await cri.pull_image(img.reference)
            assert ref == img.image_id
            await cri.pull_image(img.reference)  # cached: a second success
            with pytest.raises(CriError) as missing:
                await cri.pull_image(f"{plain.host}/apps/missing:v9")
            assert missing.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(CriError):
                await cri.pull_image(secret_img.reference)  # no credentials
            hit = await cri.image_status(img.reference)
            miss = await cri.image_status(f"{plain.host}/apps/never:1")
            assert hit.HasField("image") and not miss.HasField("image")
        async with CriClient(node.endpoint) as direct:
            size = int((await direct.image_status(img.reference)).image.size)
        return size, 4

    size, n = asyncio.run(body())
    lines = wait_for_pull_lines(agent, n)
    text = agent.scrape()
    assert (
        value(text, "nodeagent_image_pulls_total", registry=plain.host, result="success", origin="kubelet")
        == 2
    )
    assert (
        value(text, "nodeagent_image_pulls_total", registry=plain.host, result="not_found", origin="kubelet")
        == 1
    )
    assert (
        value(
            text,
            "nodeagent_image_pulls_total",
            registry=private.host,
            result="unauthorized",
            origin="kubelet",
        )
        == 1
    )
    assert value(text, "nodeagent_image_pull_bytes_total", registry=plain.host) == 2 * size
    count = value(
        text,
        "nodeagent_image_pull_duration_seconds_count",
        registry=plain.host,
        result="success",
        origin="kubelet",
    )
    total = value(
        text,
        "nodeagent_image_pull_duration_seconds_sum",
        registry=plain.host,
        result="success",
        origin="kubelet",
    )
    assert count == 2 and 0 < total < 60
    assert value(text, "nodeagent_image_cache_requests_total", result="hit") == 1
    assert value(text, "nodeagent_image_cache_requests_total", result="miss") == 1
    assert value(text, "nodeagent_image_pulls_in_flight") == 0
    assert value(text, "nodeagent_image_last_pull_duration_seconds", image=img.reference) > 0
    assert value(text, "nodeagent_build_info", version="0.1.0") == 1
    assert value(text, "nodeagent_cri_upstream_up") == 1
    assert "process_resident_memory_bytes" in text

    first = lines[0]
    assert first["image"] == img.reference and first["registry"] == plain.host
    assert first["result"] == "success" and first["bytes"] == size and first["image_ref"] == img.image_id
    assert first["duration_seconds"] > 0 and first["throughput_bytes_per_second"] > 0
    failed = [line for line in lines if line["result"] == "not_found"]
    assert failed and "not found" in failed[0]["error"]

    want = {"success": 2, "not_found": 1, "unauthorized": 1}
    wait_until("status file shows the pulls", lambda: agent.status()["pulls"]["totals"] == want, 5)
    st = agent.status()
    assert st["proxy"]["upstreamOk"] is True
    out = subprocess.run(
        [sys.executable, "-m", "nodeagent", "status", "--root", str(agent.root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert img.reference in out.stdout and "healthy" in out.stdout
    assert agent.stop() == 0


def test_status_shows_the_image_cache_right_after_pulls(
    sandbox: Sandbox, registry: Registry, containerd: Containerd
) -> None:
    """Reported: `nodeagent status` said "image cache 0 images, 0 B" after 4 successful pulls (the
    figures of the start-up listing, no age shown). Now they follow the pulls and say how old they
    are, then a listing confirms them."""
    images = [sandbox.image(registry, f"apps/cache{n}", layers=1, layer_size=256 << 10) for n in range(4)]
    agent = sandbox.nodeagent(containerd)
    wait_until("the start-up listing", lambda: agent.status()["cache"] is not None, 10)
    before = agent.status()["cache"]["images"]

    async def body() -> tuple[int, int]:
        async with CriClient(agent.proxy_endpoint, retry=NO_RETRY) as cri:
            for img in images:
                await cri.pull_image(img.reference)
        async with CriClient(containerd.endpoint) as direct:
            listed = await direct.list_images()
        return len(listed), sum(int(i.size) for i in listed)

    count, size = asyncio.run(body())
    assert count == before + 4
    wait_until("status file shows the pulls", lambda: agent.status()["pulls"]["totals"] == {"success": 4}, 5)
    cache = agent.status()["cache"]
    assert (cache["images"], cache["bytes"]) == (count, size)  # in the same write as the pulls
    out = subprocess.run(
        [sys.executable, "-m", "nodeagent", "status", "--root", str(agent.root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("image cache"))
    want = f"image cache    {count} images, {humanize.size(size, binary=True)}; imagefs "
    assert line.startswith(want), line
    assert "% used" in line and line.endswith(" ago"), line  # measured, and how long ago

    # a listing confirms them once pulls settle (the eviction loop's or the daemon's own)
    pulled_at = cache["at"]
    wait_until(
        "a listing after the pulls",
        lambda: agent.status()["cache"]["at"] > pulled_at and agent.status()["cache"]["source"] != "pulls",
        15,
    )
    cache = agent.status()["cache"]
    assert (cache["images"], cache["bytes"]) == (count, size)
    assert agent.stop() == 0


def test_canary_password_never_leaks(sandbox: Sandbox, two_registries: Any) -> None:
    _plain, private, node = two_registries
    canary = "canary-pw-5b1f0c7e"
    b64 = base64.b64encode(f"nobody:{canary}".encode()).decode()
    img = sandbox.image(private, "apps/secret", layers=1, layer_size=64 << 10)
    agent = sandbox.nodeagent(node)
    errors: list[str] = []

    async def body() -> None:
        async with CriClient(agent.proxy_endpoint, retry=NO_RETRY) as cri:
            with pytest.raises(CriError) as wrong_user:
                await cri.pull_image(img.reference, auth={"username": "nobody", "password": canary})
            errors.append(str(wrong_user.value))
            with pytest.raises(CriError) as wrong_auth:
                await cri.pull_image(img.reference, auth={"auth": canary})  # not even base64
            errors.append(str(wrong_auth.value))
            with pytest.raises(CriError) as wrong_b64:
                await cri.pull_image(img.reference, auth={"auth": b64})
            errors.append(str(wrong_b64.value))
            ref = await cri.pull_image(img.reference, auth={"username": "puller", "password": canary})
            assert ref == img.image_id

    asyncio.run(body())
    wait_for_pull_lines(agent, 4)
    scrape = agent.scrape()
    results = [line["result"] for line in agent.log_lines() if line.get("msg") == "pull"]
    assert results == ["unauthorized", "unauthorized", "unauthorized", "success"]
    assert agent.stop() == 0  # flushes the last-used state and the final status file
    for text in [*errors, scrape]:
        assert canary not in text and b64 not in text
    leaked = [
        str(p)
        for p in [*agent.root.rglob("*"), agent.log_path, agent.config_path]
        if p.is_file() and (canary.encode() in p.read_bytes() or b64.encode() in p.read_bytes())
    ]
    assert leaked == []
    assert (agent.root / "var/lib/nodeagent/last-used.json").is_file()


def test_promtool_and_a_real_prometheus_scrape(
    sandbox: Sandbox, registry: Registry, containerd: Containerd
) -> None:
    img = sandbox.image(registry, "apps/prom", layers=1, layer_size=64 << 10)
    agent = sandbox.nodeagent(containerd)

    async def body() -> None:
        async with CriClient(agent.proxy_endpoint) as cri:
            for _ in range(3):
                await cri.pull_image(img.reference)

    asyncio.run(body())
    wait_for_pull_lines(agent, 3)
    scrape = agent.scrape()
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr

    target = agent.status()["metrics"]["listen"]
    work = sandbox.dir / "prometheus"
    work.mkdir()
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: nodeagent\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    prom = Daemon(
        "prometheus",
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        work / "prometheus.log",
    )
    prom.start()
    sandbox.callback(prom.stop)
    query = 'sum(nodeagent_image_pulls_total{result="success"})'
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    got: list[Any] = []

    def answered() -> bool:
        prom.check_alive()
        with urllib.request.urlopen(url, timeout=2) as r:
            data = json.load(r)
        got[:] = data["data"]["result"]
        return bool(got) and float(got[0]["value"][1]) == 3.0

    wait_until(f"Prometheus query {query} == 3 (log {work / 'prometheus.log'})", answered, 60, interval=0.5)


def test_containerd_down_gives_fast_unavailable_then_recovers(
    sandbox: Sandbox, registry: Registry, containerd: Containerd
) -> None:
    img = sandbox.image(registry, "apps/recover", layers=1, layer_size=64 << 10)
    agent = sandbox.nodeagent(containerd)
    pid = agent.pid

    async def body() -> None:
        async with CriClient(agent.proxy_endpoint, timeout=10.0, retry=NO_RETRY) as cri:
            await cri.pull_image(img.reference)
            containerd.kill()
            t0 = time.monotonic()
            with pytest.raises(CriError) as down:
                await cri.image_status(img.reference)
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 2.0  # not the 10 s deadline
            code, text = await asyncio.to_thread(agent.get, "/healthz")
            assert code == 503 and "not answering" in text
            assert (await asyncio.to_thread(agent.get, "/metrics"))[0] == 200  # metrics keep working
            await asyncio.to_thread(containerd.start)
            deadline = time.monotonic() + 15
            while True:
                try:
                    st = await cri.image_status(img.reference)
                    break
                except CriError:
                    assert time.monotonic() < deadline, "proxy did not recover"
                    await asyncio.sleep(0.2)
            assert st.image.id == img.image_id
            code, _ = await asyncio.to_thread(agent.get, "/healthz")
            assert code == 200

    asyncio.run(body())
    assert agent.pid == pid and agent.running  # same process throughout


def test_kill_9_during_a_pull_then_restart_and_retry(sandbox: Sandbox, registry: Registry) -> None:
    img: PushedImage = sandbox.image(registry, "apps/big", layers=2, layer_size=3 << 20)
    slow = sandbox.throttle_proxy(registry, 1 << 20)  # ~6 s for the layers
    node = sandbox.containerd([registry])
    node.write_hosts_toml(slow.address, f"http://{slow.address}")
    ref = f"{slow.address}/{img.repository}:{img.tag}"
    agent = sandbox.nodeagent(node)

    async def first_attempt() -> None:
        async with CriClient(agent.proxy_endpoint, retry=NO_RETRY) as cri:
            pull = asyncio.ensure_future(cri.pull_image(ref))
            deadline = time.monotonic() + 10
            while slow.bytes_down < (256 << 10):  # layers are flowing
                assert time.monotonic() < deadline and not pull.done()
                await asyncio.sleep(0.05)
            agent.kill()
            with pytest.raises(CriError) as died:
                await pull
            assert died.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(first_attempt())
    assert agent.proxy_socket.exists()  # the stale socket of the killed process
    down = subprocess.run(
        [sys.executable, "-m", "nodeagent", "status", "--root", str(agent.root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1 and "is gone" in down.stdout, down.stdout
    agent.start()  # replaces it

    async def retry() -> str:
        async with CriClient(agent.proxy_endpoint) as cri:
            got = await cri.pull_image(ref)
            st = await cri.image_status(ref)
            assert st.image.id == img.image_id
            return got

    assert asyncio.run(retry()) == img.image_id
    check = subprocess.run(
        ["ctr", "--address", str(node.socket), "--namespace", "k8s.io", "images", "check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    row = [line for line in check.stdout.splitlines() if line.startswith(ref + " ")]
    assert row and "complete" in row[0], check.stdout
    lines = wait_for_pull_lines(agent, 1)
    assert lines[-1]["result"] == "success"


def test_stale_socket_of_a_live_agent_is_not_stolen(sandbox: Sandbox, containerd: Containerd) -> None:
    agent = sandbox.nodeagent(containerd)
    second = NodeAgent(sandbox.dir / "second", containerd.endpoint)
    second.root = agent.root  # same --root: same proxy socket path
    second.workdir.mkdir(parents=True)
    second.config_path.write_text(Path(agent.config_path).read_text())
    out = subprocess.run(
        [sys.executable, "-m", "nodeagent", "run", "-c", str(second.config_path), "--root", str(agent.root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "another process is serving" in out.stderr
    assert agent.running and agent.proxy_socket.exists()


def test_systemd_notifications_and_sigterm(sandbox: Sandbox, containerd: Containerd) -> None:
    """A FAKE systemd: a datagram socket as NOTIFY_SOCKET, as systemd passes it to Type=notify units."""
    path = str(sandbox.dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        agent = sandbox.nodeagent(containerd, start=False)
        t0 = time.monotonic()
        agent.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        first = sock.recv(256).decode()
        ready_after = time.monotonic() - t0
        assert first.startswith("READY=1"), first
        assert sock.recv(256) == b"WATCHDOG=1"
        assert agent.stop() == 0
        rest = []
        sock.settimeout(2)
        with contextlib.suppress(TimeoutError):
            while True:
                rest.append(sock.recv(256).decode())
        assert "STOPPING=1" in rest
        ready = next(e for e in agent.log_lines() if e.get("msg") == "ready")
        in_daemon = ready["startup_seconds"]
        print(f"READY {ready_after * 1000:.0f} ms after process start ({in_daemon} s in the daemon)")
    finally:
        sock.close()
