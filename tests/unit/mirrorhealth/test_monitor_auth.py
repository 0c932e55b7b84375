"""MirrorHealth with credentials and mirror-only registries (issue 15): a fake probe, a fake clock, a
provider plugin stand-in (no subprocess) and an in-memory hosts writer."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent.config.model import Mirror, MirrorCredentials, MirrorHealthConfig
from nodeagent.images.credentials import MirrorCredentialSource, ProviderPlugins, parse_provider_config
from nodeagent.mirrorhealth.monitor import MirrorHealth
from nodeagent.mirrorhealth.probe import ProbeResult, ProbeTarget
from nodeagent.proxy.h2grpc import RpcError
from nodeagent.run.metrics import Metrics
from nodeagent.util import proc

SETTINGS = MirrorHealthConfig(
    interval=2.0, timeout=1.0, failures_before_down=3, successes_before_up=2, hold_time=60.0
)
M = Mirror("http://mirror:5000", credentials=MirrorCredentials("provider"))
N = Mirror("http://other:5000")
CANARY = "CANARY-mirror-token"


class Writer:
    """Remembers the mirrors (with their headers) each registry's file holds."""

    def __init__(self, files: dict[str, tuple[Mirror, ...]]) -> None:
        self.files = dict(files)
        self.writes: list[tuple[str, tuple[Mirror, ...]]] = []

    def endpoints_in_file(self, registry: str) -> frozenset[str] | None:
        return frozenset(m.endpoint for m in self.files[registry])

    def write(self, registry: str, active: tuple[Mirror, ...]) -> bool:
        changed = self.files.get(registry) != active
        self.files[registry] = active
        if changed:
            self.writes.append((registry, active))
        return changed

    def header(self, registry: str, endpoint: str) -> str | None:
        for m in self.files[registry]:
            if m.endpoint == endpoint:
                return dict(m.header).get("Authorization", (None,))[0]
        return None


class Plugin:
    """Stands in for proc.run of a credential provider: a new password per run, or a failure."""

    def __init__(self, cache: str = "10s") -> None:
        self.runs = 0
        self.fail = False
        self.cache = cache

    def __call__(self, argv: list[str], **kw: Any) -> proc.Result:
        if self.fail:
            return proc.Result(1, b"", f"cannot reach the token service; last token {CANARY}".encode())
        self.runs += 1
        body = {
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "kind": "CredentialProviderResponse",
            "cacheKeyType": "Registry",
            "cacheDuration": self.cache,
            "auth": {"*:5000": {"username": "robot", "password": f"{CANARY}-{self.runs}"}},
        }
        return proc.Result(0, json.dumps(body).encode(), b"")


def basic(n: int) -> str:
    return "Basic " + base64.b64encode(f"robot:{CANARY}-{n}".encode()).decode()


class Net:
    def __init__(self) -> None:
        self.now = 1000.0
        self.answer: dict[str, ProbeResult] = {}
        self.seen: list[tuple[str, tuple[tuple[str, str], ...]]] = []

    async def probe(self, target: ProbeTarget, timeout_s: float) -> ProbeResult:
        self.seen.append((target.endpoint, target.headers))
        return self.answer.get(target.endpoint, ProbeResult(True, 0.01, 200, "", True))

    def clock(self) -> float:
        return self.now


def make(
    mirrors: tuple[Mirror, ...] = (M,), mirror_only: bool = False, metrics: Metrics | None = None
) -> tuple[MirrorHealth, Net, Writer, Plugin]:
    net, plugin = Net(), Plugin()
    cfg = {
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [
            {
                "name": "test-provider",
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                "matchImages": ["*:5000"],
                "defaultCacheDuration": "1m",
            }
        ],
    }
    plugins = ProviderPlugins(parse_provider_config(json.dumps(cfg), "cfg"), Path("/bin"), run=plugin)

    def source_for(m: Mirror) -> MirrorCredentialSource | None:
        if m.credentials is None:
            return None
        return MirrorCredentialSource(m.endpoint, "provider", plugins=lambda: plugins, clock=net.clock)

    writer = Writer({"r.example": mirrors})
    mh = MirrorHealth(
        [("r.example", mirrors)],
        SETTINGS,
        writer,
        metrics,
        prober=net.probe,
        clock=net.clock,
        wall=net.clock,
        mirror_only=frozenset({"r.example"}) if mirror_only else frozenset(),
        source_for=source_for,
    )
    return mh, net, writer, plugin


def step(mh: MirrorHealth, net: Net, n: int = 1, dt: float = 2.0) -> None:
    async def go() -> None:
        for _ in range(n):
            for e in mh._mirrors:
                await mh.probe_once(e)
            net.now += dt

    asyncio.run(go())


def test_credentials_are_written_probed_with_and_rotated_at_half_their_lifetime() -> None:
    mh, net, w, plugin = make()
    step(mh, net)
    assert w.header("r.example", M.endpoint) == basic(1)
    assert net.seen[-1] == (M.endpoint, (("Authorization", basic(1)),))  # the probe authenticates
    step(mh, net, 2)  # t = +4 s: less than half of 10 s
    assert plugin.runs == 1
    step(mh, net, 1)  # t = +6 s: refreshed, file rewritten with the new value
    assert plugin.runs == 2 and w.header("r.example", M.endpoint) == basic(2)
    assert net.seen[-1][1] == (("Authorization", basic(2)),)
    st = json.dumps(mh.status())
    assert CANARY not in st and "robot" not in st
    assert mh.status()["mirrors"][0]["credentials"]["refreshes"] == 2


def test_a_failing_provider_keeps_the_credentials_until_they_expire_then_the_mirror_is_out() -> None:
    metrics = Metrics()
    mh, net, w, plugin = make(mirrors=(M, N), metrics=metrics)
    step(mh, net)
    plugin.fail = True
    step(mh, net, 4)  # t = +8 s: refresh failed since +6 s, but the value is valid until +10 s
    assert [m.endpoint for m in w.files["r.example"]] == [M.endpoint, N.endpoint]
    step(mh, net, 1)  # t = +10 s: expired: out at once (no failure streak, no hold)
    assert [m.endpoint for m in w.files["r.example"]] == [N.endpoint]
    labels = {"registry": "r.example", "mirror": M.endpoint}
    assert metrics.registry.get_sample_value("nodeagent_mirror_auth_ok", labels) == 0
    assert metrics.registry.get_sample_value("nodeagent_mirror_up", labels) == 0
    entry = mh.status()["mirrors"][0]
    assert entry["state"] == "down" and entry["authOk"] is False and not entry["credentials"]["present"]
    assert entry["credentials"]["error"] == "credential provider test-provider: exit 1"
    line = mh.status()["summary"][0]
    assert "credentials: unavailable (credential provider test-provider: exit 1)" in line
    assert CANARY not in json.dumps(mh.status())
    plugin.fail = False
    step(mh, net, 32)  # credentials back: up again once the hold time (60 s) after going down is over
    assert [m.endpoint for m in w.files["r.example"]] == [M.endpoint, N.endpoint]


def test_401_with_credentials_is_a_failure_counted_like_a_dead_mirror() -> None:
    metrics = Metrics()
    mh, net, w, _ = make(mirrors=(M, N), metrics=metrics)
    net.answer[M.endpoint] = ProbeResult(False, 0.01, 401, "HTTP 401: credentials refused", False)
    step(mh, net, 2)
    assert [m.endpoint for m in w.files["r.example"]] == [M.endpoint, N.endpoint]
    step(mh, net, 1)
    assert [m.endpoint for m in w.files["r.example"]] == [N.endpoint]
    labels = {"registry": "r.example", "mirror": M.endpoint}
    assert metrics.registry.get_sample_value("nodeagent_mirror_auth_ok", labels) == 0
    assert "credentials: refused" in mh.status()["summary"][0]


def test_mirror_only_never_loses_its_last_mirror_and_pulls_fail_fast_with_the_reason() -> None:
    a, b = Mirror("http://a:1"), Mirror("http://b:1")
    mh, net, w, _ = make(mirrors=(a, b), mirror_only=True)
    net.answer[a.endpoint] = ProbeResult(False, 1.0, None, "connection refused")
    step(mh, net, 3)
    assert w.files["r.example"] == (b,)
    net.answer[b.endpoint] = ProbeResult(False, 1.0, None, "timeout after 1s")
    step(mh, net, 3)
    assert w.files["r.example"] == (b,)  # the last one stays (containerd would go upstream without it)
    assert mh.status()["mirrors"][1]["inHostsToml"] is True
    assert "mirror-only: the last mirror is never taken out" in mh.status()["summary"][1]
    why = mh.unavailable("r.example")
    assert why is not None and "mirror-only" in why and "http://a:1: connection refused" in why

    async def call() -> str:
        raise AssertionError("a pull with no usable mirror must not reach containerd")

    with pytest.raises(RpcError) as e:
        asyncio.run(mh.run_with_failover("r.example", call))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no mirror is up" in e.value.details()
    assert mh.unavailable("other.example") is None
    # one answer again: pulls are let through at once, before the mirror counts as up
    net.answer.pop(b.endpoint)
    step(mh, net, 1)
    assert mh.unavailable("r.example") is None


def test_a_pull_stuck_when_the_last_mirror_of_a_mirror_only_registry_dies_fails_instead_of_retrying() -> None:
    a = Mirror("http://a:1")
    mh, net, _, _ = make(mirrors=(a,), mirror_only=True)
    calls = 0

    async def scenario() -> None:
        nonlocal calls

        async def stuck() -> str:
            nonlocal calls
            calls += 1
            await asyncio.sleep(30)
            return "never"

        pull = asyncio.ensure_future(mh.run_with_failover("r.example", stuck))
        await asyncio.sleep(0)
        net.answer[a.endpoint] = ProbeResult(False, 1.0, None, "timeout after 1s")
        for _ in range(3):
            await mh.probe_once(mh._mirrors[0])
            net.now += 2
        with pytest.raises(RpcError, match="mirror-only"):
            await asyncio.wait_for(pull, 5)

    asyncio.run(scenario())
    assert calls == 1


def test_at_start_every_mirror_gets_its_credentials_before_the_file_is_rewritten() -> None:
    m2 = Mirror("http://mirror2:5000", credentials=MirrorCredentials("provider"))
    mh, _, w, plugin = make(mirrors=(M, m2))

    async def stop(_: float) -> None:
        raise asyncio.CancelledError

    mh._sleep = stop  # each probe loop ends after its first probe
    asyncio.run(mh.run())
    assert plugin.runs >= 2
    assert [m.endpoint for m in w.files["r.example"]] == [M.endpoint, m2.endpoint]
    assert all(w.header("r.example", m.endpoint) for m in (M, m2))
