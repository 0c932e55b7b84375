"""MirrorHealth with a fake probe, a fake clock and an in-memory hosts writer: no sockets, no sleeping."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from nodeagent.config.model import Mirror, MirrorHealthConfig
from nodeagent.mirrorhealth.failover import NotOwnedError
from nodeagent.mirrorhealth.monitor import MirrorHealth, display_endpoint
from nodeagent.mirrorhealth.probe import ProbeResult, ProbeTarget
from nodeagent.run.metrics import Metrics

A = Mirror("http://mirror-a:5000")
B = Mirror("http://mirror-b:5000")
C = Mirror("https://user:pw@mirror-c/v2/hub", override_path=True)
SETTINGS = MirrorHealthConfig(
    interval=2.0, timeout=1.0, failures_before_down=3, successes_before_up=2, hold_time=60.0
)


class FakeWriter:
    """Stands in for HostsFileWriter: remembers what each registry's file lists."""

    def __init__(self, files: dict[str, tuple[str, ...]], owned: bool = True) -> None:
        self.files = dict(files)
        self.owned = owned
        self.writes: list[tuple[str, tuple[str, ...]]] = []

    def endpoints_in_file(self, registry: str) -> frozenset[str] | None:
        return frozenset(self.files[registry]) if self.owned and registry in self.files else None

    def write(self, registry: str, active: tuple[Mirror, ...]) -> bool:
        if not self.owned:
            raise NotOwnedError(
                f"/etc/containerd/certs.d/{registry}/hosts.toml: no nodeagent ownership marker"
            )
        new = tuple(m.endpoint for m in active)
        changed = self.files.get(registry) != new
        self.files[registry] = new
        if changed:
            self.writes.append((registry, new))
        return changed


class FakeNet:
    """The probe: per-endpoint alive flag; a fake clock that tests advance."""

    def __init__(self) -> None:
        self.alive: dict[str, bool] = {}
        self.now = 1000.0

    async def probe(self, target: ProbeTarget, timeout_s: float) -> ProbeResult:
        ok = self.alive.get(target.endpoint, True)
        return ProbeResult(
            ok, 0.01 if ok else timeout_s, 200 if ok else None, "" if ok else "timeout after 1s"
        )

    def clock(self) -> float:
        return self.now


def make(
    writer: FakeWriter | None = None, metrics: Metrics | None = None, mirrors: tuple[Mirror, ...] = (A, B)
) -> tuple[MirrorHealth, FakeNet, FakeWriter]:
    net = FakeNet()
    w = writer or FakeWriter({"docker.io": tuple(m.endpoint for m in mirrors)})
    mh = MirrorHealth(
        [("docker.io", mirrors)], SETTINGS, w, metrics, prober=net.probe, clock=net.clock, wall=net.clock
    )
    return mh, net, w


def rounds(mh: MirrorHealth, net: FakeNet, n: int, step: float = 2.0) -> None:
    async def go() -> None:
        for _ in range(n):
            for e in mh._mirrors:
                await mh.probe_once(e)
            net.now += step

    asyncio.run(go())


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    v = m.registry.get_sample_value(name, labels)
    return v


def test_dead_mirror_is_taken_out_after_n_failures_server_and_order_of_others_kept() -> None:
    metrics = Metrics()
    mh, net, w = make(metrics=metrics, mirrors=(A, B, C))
    net.alive[A.endpoint] = False
    rounds(mh, net, 2)
    assert w.writes == []
    rounds(mh, net, 1)
    assert w.writes == [("docker.io", (B.endpoint, C.endpoint))]
    assert sample(metrics, "nodeagent_mirror_up", registry="docker.io", mirror=A.endpoint) == 0
    assert sample(metrics, "nodeagent_mirror_up", registry="docker.io", mirror=B.endpoint) == 1
    assert (
        sample(
            metrics,
            "nodeagent_mirror_failovers_total",
            registry="docker.io",
            mirror=A.endpoint,
            direction="down",
        )
        == 1
    )
    assert (
        sample(
            metrics, "nodeagent_mirror_probe_duration_seconds_count", registry="docker.io", mirror=A.endpoint
        )
        == 3
    )
    st = mh.status()
    assert st["degraded"] is True
    a = st["mirrors"][0]
    assert (a["mirror"], a["state"], a["inHostsToml"], a["lastProbe"]["error"]) == (
        A.endpoint,
        "down",
        False,
        "timeout after 1s",
    )
    assert st["summary"][0] == (
        "docker.io  http://mirror-a:5000  DOWN since 00:16:44Z; last probe failed: timeout after 1s; "
        "3 failures in a row; out of hosts.toml"
    )
    assert st["summary"][1] == (
        "docker.io  http://mirror-b:5000  UP; last probe HTTP 200 in 10 ms; 3 good in a row; in hosts.toml"
    )


def test_mirror_that_comes_back_is_restored_after_m_successes_once_held_long_enough() -> None:
    metrics = Metrics()
    mh, net, w = make(metrics=metrics)
    net.alive[A.endpoint] = False
    rounds(mh, net, 3)  # down at t=1004
    net.alive[A.endpoint] = True
    rounds(mh, net, 2)  # 2 successes, but within the hold time
    assert len(w.writes) == 1
    rounds(mh, net, 30)
    assert w.writes[-1] == ("docker.io", (A.endpoint, B.endpoint))  # back in its configured place
    assert len(w.writes) == 2
    assert (
        sample(
            metrics,
            "nodeagent_mirror_failovers_total",
            registry="docker.io",
            mirror=A.endpoint,
            direction="up",
        )
        == 1
    )
    assert mh.status()["degraded"] is False


def test_flapping_mirror_rewrites_hosts_toml_at_most_once_per_hold_period() -> None:
    mh, net, w = make()
    times: list[float] = []
    for i in range(900):  # 30 min of probes every 2 s, pattern: 3 dead, 2 alive
        net.alive[A.endpoint] = i % 5 >= 3
        before = len(w.writes)
        rounds(mh, net, 1)
        if len(w.writes) != before:
            times.append(net.now)
    assert len(times) >= 2
    assert all(b - a >= SETTINGS.hold_time for a, b in itertools.pairwise(times))


def test_hosts_toml_not_owned_is_never_written_and_pulls_are_not_disturbed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = FakeWriter({"docker.io": (A.endpoint,)}, owned=False)
    metrics = Metrics()
    mh, net, _ = make(writer=w, metrics=metrics)
    net.alive[A.endpoint] = False

    async def go() -> bool:
        with mh.watch("docker.io") as ev:
            for _ in range(3):
                for e in mh._mirrors:
                    await mh.probe_once(e)
            assert ev is not None
            return ev.is_set()

    with caplog.at_level(logging.WARNING, logger="nodeagent"):
        fired = asyncio.run(go())
    assert w.writes == [] and not fired
    assert mh.status()["mirrors"][0]["state"] == "down"
    assert sample(metrics, "nodeagent_mirror_up", registry="docker.io", mirror=A.endpoint) == 0
    # no rewrite happened, so no fail-over is counted
    assert not sample(
        metrics, "nodeagent_mirror_failovers_total", registry="docker.io", mirror=A.endpoint, direction="down"
    )
    assert any("not owned" in r.getMessage() for r in caplog.records)


def test_mirror_left_out_by_apply_starts_down_and_comes_back_without_a_hold() -> None:
    w = FakeWriter({"docker.io": (B.endpoint,)})  # apply found A dead at boot
    mh, net, _ = make(writer=w)
    assert mh.status()["mirrors"][0]["state"] == "down"
    rounds(mh, net, 2)
    assert w.writes == [("docker.io", (A.endpoint, B.endpoint))]


def test_write_failure_is_retried_on_the_next_probe() -> None:
    class Flaky(FakeWriter):
        fail = True

        def write(self, registry: str, active: tuple[Mirror, ...]) -> bool:
            if self.fail:
                raise OSError(28, "No space left on device")
            return super().write(registry, active)

    w = Flaky({"docker.io": (A.endpoint, B.endpoint)})
    mh, net, _ = make(writer=w)
    net.alive[A.endpoint] = False

    async def go() -> bool:
        with mh.watch("docker.io") as ev:
            assert ev is not None
            for _ in range(3):
                for e in mh._mirrors:
                    await mh.probe_once(e)
            assert w.writes == [] and not ev.is_set()  # nothing changed on disk: a retry would not help
            w.fail = False
            for e in mh._mirrors:
                await mh.probe_once(e)
            return ev.is_set()

    assert asyncio.run(go()) is True  # the write landed: waiting pulls go again
    assert w.writes == [("docker.io", (B.endpoint,))]


def test_display_endpoint_drops_credentials() -> None:
    assert display_endpoint("https://user:pw@mirror-c/v2/hub?x=1") == "https://mirror-c/v2/hub"
    mh, _, _ = make(mirrors=(C,))
    assert "pw" not in str(mh.status())


# --- stuck pulls --------------------------------------------------------------------------------


def test_pull_stuck_on_a_mirror_that_goes_down_is_cancelled_and_retried_once() -> None:
    mh, net, w = make()
    net.alive[A.endpoint] = False
    calls: list[str] = []
    cancelled: list[bool] = []

    async def pull() -> str:
        calls.append("call")
        if len(calls) == 1:
            try:
                await asyncio.sleep(3600)  # hangs on the dead mirror
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
        return "sha256:abc"

    async def go() -> tuple[str, str | None]:
        task = asyncio.create_task(mh.run_with_failover("docker.io", pull))
        await asyncio.sleep(0)
        for _ in range(3):
            for e in mh._mirrors:
                await mh.probe_once(e)
        return await asyncio.wait_for(task, 5)

    result, reason = asyncio.run(go())
    assert (result, reason) == ("sha256:abc", "mirror_down")
    assert calls == ["call", "call"] and cancelled == [True]
    assert w.writes == [("docker.io", (B.endpoint,))]


def test_pull_that_finishes_is_not_retried_and_watchers_do_not_leak() -> None:
    mh, _, _ = make()

    async def pull() -> str:
        return "ref"

    assert asyncio.run(mh.run_with_failover("docker.io", pull)) == ("ref", None)
    assert all(not s for s in mh.pulls._watchers.values())


def test_pull_errors_pass_through_unchanged() -> None:
    mh, _, _ = make()

    async def pull() -> str:
        raise RuntimeError("not found")

    with pytest.raises(RuntimeError, match="not found"):
        asyncio.run(mh.run_with_failover("docker.io", pull))


def test_registry_without_mirrors_is_not_watched_and_default_namespace_applies() -> None:
    mh, _, _ = make()
    with mh.watch("quay.io") as ev:
        assert ev is None
    mh2 = MirrorHealth([("_default", (A,))], SETTINGS, None)
    assert mh2.pulls.registry_key("quay.io") == "_default"


def test_run_probes_at_once_then_every_interval_with_jitter() -> None:
    net = FakeNet()
    delays: list[float] = []

    class Stop(Exception):
        pass

    async def sleep(d: float) -> None:
        delays.append(d)
        net.now += d
        if len(delays) >= 50:
            raise Stop

    probed: list[float] = []

    async def prober(t: ProbeTarget, timeout_s: float) -> ProbeResult:
        probed.append(net.now)
        return ProbeResult(True, 0.0, 200)

    mh = MirrorHealth([("docker.io", (A,))], SETTINGS, None, prober=prober, clock=net.clock, sleep=sleep)
    with pytest.raises(ExceptionGroup):
        asyncio.run(mh.run())
    assert probed[0] == 1000.0
    assert all(1.8 <= d <= 2.2 for d in delays) and len(set(delays)) > 10


def test_ca_paths_resolve_like_containerd_under_root(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nodeagent.mirrorhealth.monitor import ca_resolver
    from nodeagent.util.paths import Paths

    resolve = ca_resolver(Paths(tmp_path), "/etc/containerd/certs.d")
    assert resolve("docker.io", "/etc/pki/mirror.pem") == tmp_path / "etc/pki/mirror.pem"
    assert resolve("docker.io", "mirror.crt") == tmp_path / "etc/containerd/certs.d/docker.io/mirror.crt"


def test_from_config_is_none_without_mirrors_or_when_disabled(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nodeagent.config.model import Config, ContainerdConfig
    from nodeagent.mirrorhealth.monitor import from_config
    from nodeagent.util.paths import Paths

    assert from_config(Config(), Paths(tmp_path)) is None
    off = Config(
        containerd=ContainerdConfig(
            mirrors=(("docker.io", (A,)),), mirror_health=MirrorHealthConfig(enabled=False)
        )
    )
    assert from_config(off, Paths(tmp_path)) is None
    on = Config(containerd=ContainerdConfig(mirrors=(("docker.io", (A,)),)))
    mh = from_config(on, Paths(tmp_path))
    assert mh is not None and mh.status()["mirrors"][0]["mirror"] == A.endpoint


def test_nodeagent_run_wires_mirror_health_into_the_daemon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nodeagent.commands.run import build_daemon
    from nodeagent.config.model import Config, ContainerdConfig
    from nodeagent.util.paths import Paths

    with_mirrors = Config(containerd=ContainerdConfig(mirrors=(("docker.io", (A,)),)))
    d = build_daemon(with_mirrors, Paths(tmp_path))
    assert "mirrorhealth" in d._workers and "mirrorHealth" in d._status_hooks
    assert d._pull_wrapper is not None
    assert d.status().sections["mirrorHealth"].fields["mirrors"][0]["mirror"] == A.endpoint
    plain = build_daemon(Config(), Paths(tmp_path))
    assert "mirrorhealth" not in plain._workers and plain._pull_wrapper is None
