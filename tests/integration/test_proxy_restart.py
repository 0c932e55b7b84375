"""No refused kubelet call across restarts: ``nodeagent run`` under socket activation.

The sandbox has no systemd as PID 1, so the test plays systemd's part (tests/sandbox/activation.py):
it holds the listening socket, as nodeagent.socket does, and starts each daemon through Debian's
``systemd-socket-activate`` with that socket passed (LISTEN_FDS). What users rely on:

- a connection made while no daemon runs waits in the socket's backlog and is answered once the
  daemon is back; a SIGTERM'd daemon leaves the socket in place for the next one;
- chaos: a kubelet-like client (grpc with the connect settings of the kubelet's CRI client) pulls
  and asks ImageStatus continuously for 60 s while the daemon is SIGKILLed and restarted 10 times:
  no connection or call is ever refused (ECONNREFUSED/ENOENT/EAGAIN), calls in flight at a kill
  fail with UNAVAILABLE and succeed on retry, and the metrics after the restarts are what
  docs/proxy.md says (per-process counters start from zero; the rest is rebuilt);
- the runbook: ``cri.proxySocket: ""`` + ``nodeagent apply`` takes the proxy out of the kubelet's
  config, and the daemon still runs with the socket unit passing it a socket it does not serve.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.cri.gen import cri_api_pb2 as cri
from nodeagent.cri.gen import cri_api_pb2_grpc as cri_grpc
from nodeagent.proxy import sockets
from tests.sandbox import Containerd, NodeAgent, Registry, Sandbox
from tests.sandbox.agent import REPO
from tests.sandbox.process import wait_until

CHAOS_SECONDS = 60.0
KILLS = 10
RESTART_DELAY = 1.0  # systemd's RestartSec= (2 s in the unit): no daemon at all for this long
RETRY_DELAY = 0.2
MAX_ATTEMPTS = 100  # a call still UNAVAILABLE after 20 s of retries fails the test
# A call sent on the killed daemon's connection before the client saw it close also fails with
# UNAVAILABLE; it counts as in flight at the kill if it started at most this long after the death.
IN_FLIGHT_GRACE = 0.5
REFUSED_WORDS = ("refused", "no such file", "enoent", "econnrefused", "resource temporarily unavailable")


def metric(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


# The kubelet's CRI client (k8s.io/cri-client): a connection attempt gets 5 s (the server's HTTP/2
# SETTINGS included), reconnects back off from 100 ms to 3 s, no retries of calls. In grpc core the
# minimum connect timeout is the "min_reconnect_backoff" argument.
KUBELET_CHANNEL_OPTIONS = [
    ("grpc.min_reconnect_backoff_ms", 5000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 3000),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 16 << 20),
]


def kubelet_channel(agent: NodeAgent) -> grpc.Channel:
    return grpc.insecure_channel(agent.proxy_endpoint, options=KUBELET_CHANNEL_OPTIONS)


def image_status_request(ref: str) -> cri.ImageStatusRequest:
    return cri.ImageStatusRequest(image=cri.ImageSpec(image=ref))


def pull_request(ref: str) -> cri.PullImageRequest:
    return cri.PullImageRequest(image=cri.ImageSpec(image=ref))


def settled_scrape(agent: NodeAgent) -> str:
    """/metrics once the pull records of answered pulls are all in (they follow the answer)."""
    seen: list[str] = []

    def still() -> bool:
        text = agent.scrape()
        key = [line for line in text.splitlines() if line.startswith("nodeagent_image_pull")]
        seen.append("\n".join(key))
        return metric(text, "nodeagent_image_pulls_in_flight") == 0 and seen[-2:] == [seen[-1]] * 2

    wait_until("settled pull metrics", still, 20, interval=0.5)
    return agent.scrape()


def listen_backlog(path: Path) -> int:
    """The backlog of the socket listening on ``path``, as ``ss`` shows it (Send-Q)."""
    out = subprocess.run(["ss", "-xlH", "src", str(path)], capture_output=True, text=True, check=True).stdout
    (line,) = out.splitlines()
    return int(line.split()[3])


def socket_activated_agent(sandbox: Sandbox, node: Containerd) -> NodeAgent:
    agent = sandbox.nodeagent(node, start=False, socket_activated=True)
    assert agent.held is not None
    return agent


def run_status(agent: NodeAgent) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeagent", "status", "--root", str(agent.root)],
        capture_output=True,
        text=True,
        timeout=30,
    )


# --- the backlog -----------------------------------------------------------------------------------
def test_a_call_made_while_no_daemon_runs_waits_in_the_backlog_and_is_answered(
    sandbox: Sandbox, containerd: Containerd, registry: Registry
) -> None:
    img = sandbox.image(registry, layers=1, layer_size=64 << 10)
    agent = socket_activated_agent(sandbox, containerd)
    assert agent.held is not None
    assert agent.proxy_socket.is_socket() and oct(agent.proxy_socket.stat().st_mode & 0o777) == "0o660"

    with kubelet_channel(agent) as ch:
        stub = cri_grpc.ImageServiceStub(ch)
        for round_ in range(2):
            # No daemon: the call connects (the socket listens) and waits for an answer.
            waiting = stub.PullImage.future(pull_request(img.reference), timeout=60)
            time.sleep(1.0)  # well inside the kubelet's 5 s to connect
            assert not waiting.done(), f"round {round_}: answered or failed with no daemon running"
            agent.start()
            assert waiting.result(timeout=30).image_ref == img.image_id
            st = agent.status()
            assert st["proxy"]["socketInherited"] is True
            assert listen_backlog(agent.proxy_socket) == sockets.BACKLOG  # the unit's, kept by the daemon
            assert st["proxy"]["socket"] == str(agent.proxy_socket)
            ready = [e for e in agent.log_lines() if e.get("msg") == "ready"]
            assert ready[-1]["socket_inherited"] is True
            shown = run_status(agent)
            assert f"proxy socket   {agent.proxy_socket} (from systemd: nodeagent.socket)" in shown.stdout
            # SIGTERM: the daemon drains and exits 0, and leaves systemd's socket where it is.
            assert agent.stop() == 0
            assert agent.proxy_socket.is_socket(), "the daemon removed the socket it was given"
    lines = agent.log_path.read_text()
    assert "Traceback" not in lines


def test_without_the_held_socket_a_restart_refuses_calls(sandbox: Sandbox, containerd: Containerd) -> None:
    """The check the chaos test relies on can fail: a daemon that binds its own socket (started by
    hand) leaves nothing listening while it is down, and a connection is refused."""
    agent = sandbox.nodeagent(containerd)
    assert agent.status()["proxy"]["socketInherited"] is False
    agent.kill()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(agent.proxy_socket))  # the stale file of the killed process
    agent.start()
    assert agent.stop() == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(FileNotFoundError):
        s.connect(str(agent.proxy_socket))  # removed by the daemon that bound it


def test_a_passed_socket_the_proxy_cannot_serve_stops_the_start_with_a_clear_error(
    sandbox: Sandbox, containerd: Containerd
) -> None:
    """A socket unit gone wrong (here a datagram socket): exit 1 naming the fd and what it is."""
    agent = sandbox.nodeagent(containerd, start=False)
    agent.root.mkdir(parents=True)
    agent.config_path.write_text(yaml.safe_dump(agent.config))
    agent.proxy_socket.parent.mkdir(parents=True)
    argv = [
        "systemd-socket-activate",
        "--datagram",
        f"--listen={agent.proxy_socket}",
        "--fdname=cri-proxy",
        f"--setenv=PYTHONPATH={REPO}",
        sys.executable,
        "-m",
        "nodeagent",
        "run",
        "-c",
        str(agent.config_path),
        "--root",
        str(agent.root),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_until("the datagram socket", agent.proxy_socket.is_socket, 10, interval=0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"wake", str(agent.proxy_socket))  # systemd-socket-activate execs the daemon on it
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert (
        "nodeagent run: LISTEN_FDS: fd 3 (cri-proxy) is AF_UNIX SOCK_DGRAM, not listening; "
        "the proxy needs a listening AF_UNIX SOCK_STREAM socket" in err
    )
    assert "Traceback" not in err


# --- chaos -----------------------------------------------------------------------------------------
@dataclass
class Attempt:
    kind: str  # "status" | "pull" | "slow-pull"
    call: int  # the call this attempt belongs to (retries share it)
    start: float
    end: float = 0.0
    code: str = ""
    details: str = ""


class Load:
    """Kubelet-like load on the proxy socket from threads: each worker issues calls back to back,
    retrying a call that failed with UNAVAILABLE (after RETRY_DELAY) until it succeeds."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.attempts: list[Attempt] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.calls = 0
        self.probes: list[tuple[float, int]] = []  # (time, errno or 0) of raw connects
        self.slow_in_flight: Attempt | None = None
        self.errors: list[BaseException] = []

    def _next_call(self) -> int:
        with self.lock:
            self.calls += 1
            return self.calls

    def call(self, kind: str, fn: Callable[[], Any]) -> Any:
        n = self._next_call()
        for _ in range(MAX_ATTEMPTS):
            a = Attempt(kind, n, time.monotonic())
            with self.lock:
                self.attempts.append(a)
                if kind == "slow-pull":
                    self.slow_in_flight = a
            try:
                result = fn()
                a.code = "OK"
                return result
            except grpc.RpcError as e:
                a.code = e.code().name
                a.details = e.details() or ""
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            finally:
                a.end = time.monotonic()
                if kind == "slow-pull":
                    self.slow_in_flight = None
            time.sleep(RETRY_DELAY)
        raise AssertionError(f"{kind} call {n}: UNAVAILABLE {MAX_ATTEMPTS} times in a row")

    def worker(self, body: Callable[[], None]) -> None:
        def loop() -> None:
            try:
                while not self.stop.is_set():
                    body()
            except BaseException as e:  # reported by the test, not lost with the thread
                self.errors.append(e)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self.threads.append(t)

    def prober(self, interval: float = 0.05) -> None:
        """Raw non-blocking connects to the socket path, as a client's first step: each one either
        succeeds at once or fails with the errno a refused call would see."""

        def loop() -> None:
            path = str(self.agent.proxy_socket)
            while not self.stop.is_set():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.setblocking(False)
                    err = s.connect_ex(path)
                self.probes.append((time.monotonic(), err))
                time.sleep(interval)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
            assert not t.is_alive(), "a load thread did not finish"


def test_chaos_sigkill_and_restart_under_load_refuses_nothing(sandbox: Sandbox, registry: Registry) -> None:
    fast = [sandbox.image(registry, layers=1, layer_size=64 << 10) for _ in range(2)]
    big = sandbox.image(registry, layers=2, layer_size=3 << 20)
    slow = sandbox.throttle_proxy(registry, 2 << 20)  # ~3 s per pull of the big image
    node = sandbox.containerd([registry])
    node.write_hosts_toml(slow.address, f"http://{slow.address}")
    slow_ref = f"{slow.address}/{big.repository}:{big.tag}"
    missing = f"{registry.host}/never/there:1"

    direct = grpc.insecure_channel(node.endpoint)
    direct_images = cri_grpc.ImageServiceStub(direct)
    for img in fast:  # present: PullImage through the proxy is a cached pull (still resolves the tag)
        direct_images.PullImage(pull_request(img.reference), timeout=60)

    agent = socket_activated_agent(sandbox, node)
    agent.start()
    load = Load(agent)
    channels = [kubelet_channel(agent) for _ in range(2)]  # the kubelet's image client, and crictl's
    stubs = [cri_grpc.ImageServiceStub(ch) for ch in channels]
    counter = iter(range(1 << 30))

    def status_body(stub: Any) -> Callable[[], None]:
        def body() -> None:
            i = next(counter)
            ref = missing if i % 5 == 0 else fast[i % 2].reference
            load.call("status", lambda: stub.ImageStatus(image_status_request(ref), timeout=30))

        return body

    def pull_body() -> None:
        ref = fast[next(counter) % 2].reference
        got = load.call("pull", lambda: stubs[1].PullImage(pull_request(ref), timeout=120))
        assert got.image_ref in {img.image_id for img in fast}

    def slow_pull_body() -> None:
        got = load.call("slow-pull", lambda: stubs[0].PullImage(pull_request(slow_ref), timeout=120))
        assert got.image_ref == big.image_id
        # Gone again (straight from containerd), so the next pull takes seconds and spans a kill.
        direct_images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=big.image_id)), timeout=30)

    load.worker(status_body(stubs[0]))
    load.worker(status_body(stubs[1]))
    load.worker(pull_body)
    load.worker(slow_pull_body)
    load.prober()

    kills: list[tuple[float, float, float]] = []  # (kill sent, process gone, next daemon ready)
    t0 = time.monotonic()
    try:
        for k in range(KILLS):
            # Each kill lands while the slow pull is moving bytes (a call certainly in flight).
            not_before = t0 + (k + 1) * CHAOS_SECONDS / (KILLS + 1)
            while time.monotonic() < not_before:
                time.sleep(0.05)
            moved = slow.bytes_down

            def pulling(moved: int = moved) -> bool:
                a = load.slow_in_flight
                return a is not None and a.start > (kills[-1][0] if kills else 0) and slow.bytes_down > moved

            wait_until("the slow pull in flight", pulling, 30, interval=0.02)
            sent = time.monotonic()
            agent.kill()
            gone = time.monotonic()
            time.sleep(RESTART_DELAY)
            agent.start(timeout=60)  # systemd-socket-activate with the held socket, as Restart= does
            kills.append((sent, gone, time.monotonic()))
        while time.monotonic() < t0 + CHAOS_SECONDS:
            time.sleep(0.1)
    finally:
        load.join()
    elapsed = time.monotonic() - t0

    assert not load.errors, load.errors
    # 1. Nothing was ever refused: not a raw connect, not a call.
    errors = [(t - t0, errno.errorcode.get(e, e)) for t, e in load.probes if e]
    assert not errors, f"connects refused: {errors[:10]}"
    during_downtime = [t for t, _ in load.probes if any(g <= t <= r for _, g, r in kills)]
    assert len(during_downtime) >= KILLS, "the prober must have connected while no daemon ran"
    attempts = load.attempts
    assert {a.code for a in attempts} <= {"OK", "UNAVAILABLE"}, {a.code for a in attempts}
    refused = [a for a in attempts if any(w in a.details.lower() for w in REFUSED_WORDS)]
    assert not refused, refused[:5]

    # 2. Only calls in flight at a kill failed, with UNAVAILABLE, and each succeeded on retry.
    failed = [a for a in attempts if a.code == "UNAVAILABLE"]
    for a in failed:
        assert any(a.start <= g + IN_FLIGHT_GRACE and a.end >= s for s, g, _ in kills), (
            f"{a.kind} call {a.call} failed with UNAVAILABLE at {a.start - t0:.2f}s, away from every kill "
            f"({[round(s - t0, 2) for s, _, _ in kills]}): {a.details}"
        )
    for s, _, _ in kills:  # the slow pull was cut at every kill
        cut = [a for a in failed if a.kind == "slow-pull" and a.start < s <= a.end]
        assert cut, f"kill at {s - t0:.2f}s: the slow pull in flight did not fail"
    finished = {a.call for a in attempts if a.code == "OK"}
    assert {a.call for a in failed} <= finished, "a call cut by a kill never succeeded on retry"
    ok = [a for a in attempts if a.code == "OK"]
    assert sum(a.kind == "status" for a in ok) > 200 and sum(a.kind == "pull" for a in ok) > 20

    # 3. Metrics after the restarts: every counter counts since the last start (docs/proxy.md).
    last_sent, last_gone, _ = kills[-1]
    text = settled_scrape(agent)
    by_last = metric(text, "nodeagent_cri_proxy_requests_total", method="ImageStatus", code="OK")
    low = sum(a.kind == "status" and a.start > last_gone for a in ok)
    high = sum(a.kind == "status" and a.end > last_sent for a in ok)
    total = sum(a.kind == "status" for a in ok)
    assert low <= by_last <= high < total, (low, by_last, high, total)
    start_time = metric(text, "process_start_time_seconds")
    assert time.time() - start_time <= time.monotonic() - last_gone + 2  # this process: the last one
    assert metric(text, "nodeagent_cri_upstream_up") == 1
    assert metric(text, "nodeagent_build_info", version="0.1.0") == 1

    with kubelet_channel(agent) as ch:  # exact counts from here on: the load has stopped
        stub = cri_grpc.ImageServiceStub(ch)
        for _ in range(3):
            stub.PullImage(pull_request(fast[0].reference), timeout=60)
        for _ in range(5):
            stub.ImageStatus(image_status_request(fast[1].reference), timeout=30)

    after = settled_scrape(agent)
    assert metric(after, "nodeagent_cri_proxy_requests_total", method="ImageStatus", code="OK") == by_last + 5
    assert (
        metric(after, "nodeagent_cri_proxy_requests_total", method="PullImage", code="OK")
        == metric(text, "nodeagent_cri_proxy_requests_total", method="PullImage", code="OK") + 3
    )
    assert (
        metric(after, "nodeagent_image_pulls_total", registry=registry.host, result="success")
        == metric(text, "nodeagent_image_pulls_total", registry=registry.host, result="success") + 3
    )
    assert (
        metric(after, "nodeagent_image_cache_requests_total", result="hit")
        == metric(text, "nodeagent_image_cache_requests_total", result="hit") + 5
    )
    st = agent.status()
    assert st["proxy"]["socketInherited"] is True and st["pid"] == agent.pid
    assert "Traceback" not in agent.log_path.read_text()
    direct.close()
    for ch in channels:
        ch.close()
    downtime = [round(r - g, 2) for _, g, r in kills]
    late = max(
        (a.start - g for a in failed for s, g, _ in kills if s <= a.start <= g + IN_FLIGHT_GRACE), default=0
    )
    print(
        f"\nchaos: {elapsed:.0f} s, {KILLS} SIGKILLs, {len(ok)} calls answered, {len(failed)} cut by a kill "
        f"(all retried), {len(load.probes)} raw connects ({len(during_downtime)} with no daemon), 0 refused; "
        f"no daemon for {min(downtime)}-{max(downtime)} s per restart; the latest call cut by a kill started "
        f"{late * 1000:.0f} ms after the death"
    )


# --- the runbook: the kubelet straight at containerd ----------------------------------------------------
def test_runbook_proxy_off_points_the_kubelet_at_containerd_and_the_socket_unit_is_not_in_the_way(
    sandbox: Sandbox, containerd: Containerd
) -> None:
    root = sandbox.dir / "node"
    cfg = root / "etc/nodeagent/config.yaml"
    cfg.parent.mkdir(parents=True)
    doc: dict[str, Any] = {
        "apiVersion": "nodeagent.io/v1alpha1",
        "kind": "NodeAgentConfig",
        "cri": {"endpoint": "unix:///run/containerd/containerd.sock"},
    }

    def apply(flavor: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nodeagent", "apply", "--root", str(root), "--flavor", flavor],
            capture_output=True,
            text=True,
            timeout=60,
        )

    kubelet_dropin = root / "etc/kubernetes/kubelet.conf.d/90-nodeagent.conf"
    nodeadm_dropin = root / "etc/eks/nodeadm.d/90-nodeagent.yaml"

    def endpoints() -> tuple[str | None, str | None]:
        kubelet = yaml.safe_load(kubelet_dropin.read_text())
        nodeadm = yaml.safe_load(nodeadm_dropin.read_text())["spec"]["kubelet"]["config"]
        return kubelet.get("imageServiceEndpoint"), nodeadm.get("imageServiceEndpoint")

    cfg.write_text(yaml.safe_dump(doc))
    for flavor in ("generic", "eks-al2023"):
        assert apply(flavor).returncode == 0
    assert endpoints() == ("unix:///run/nodeagent/cri.sock",) * 2

    doc["cri"]["proxySocket"] = ""  # step 1 of the runbook
    cfg.write_text(yaml.safe_dump(doc))
    for flavor in ("generic", "eks-al2023"):
        r = apply(flavor)
        assert r.returncode == 0, r.stderr
        assert "changed:" in r.stdout
        again = apply(flavor)
        assert again.returncode == 0 and "changed:" not in again.stdout  # written once
    # Left out: the kubelet's own default applies, its containerRuntimeEndpoint (containerd).
    assert endpoints() == (None, None)

    # The daemon with the proxy off while nodeagent.socket still passes the socket: it starts,
    # serves metrics and status, leaves the socket alone and says what to do about the unit.
    off = {"cri": {"proxySocket": ""}}
    agent = sandbox.nodeagent(containerd, start=False, socket_activated=True, config=off)
    assert agent.held is not None
    held_path = agent.held.path
    agent.start()
    st = agent.status()
    assert (st["proxy"]["socket"], st["proxy"]["socketInherited"]) == ("", False)
    warnings = [e for e in agent.log_lines() if "left unused" in e.get("msg", "")]
    assert warnings and warnings[0]["inherited_socket"] == str(held_path)
    assert run_status(agent).returncode == 0
    assert metric(agent.scrape(), "nodeagent_cri_upstream_up") == 1
    assert agent.stop() == 0
    assert held_path.is_socket()
