"""apply's one-shot mirror check, with a stand-in probe (no sockets)."""

from __future__ import annotations

from pathlib import Path

from nodeagent.config.model import Config, ContainerdConfig, Mirror, MirrorHealthConfig
from nodeagent.mirrorhealth.applycheck import leave_out_dead_mirrors
from nodeagent.mirrorhealth.probe import ProbeResult, ProbeTarget
from nodeagent.util.paths import Paths

A = Mirror("http://a:5000")
B = Mirror("https://u:secret@b/v2/hub", override_path=True)
C = Mirror("http://c:5000")


def config(enabled: bool = True) -> Config:
    return Config(
        containerd=ContainerdConfig(
            mirrors=(("docker.io", (A, B, C)), ("quay.io", (C,))),
            mirror_health=MirrorHealthConfig(enabled=enabled, timeout=0.5),
        )
    )


def fake(dead: set[str], calls: list[tuple[list[str], float]] | None = None):  # type: ignore[no-untyped-def]
    def probe_all(targets: list[ProbeTarget], timeout_s: float) -> list[ProbeResult]:
        if calls is not None:
            calls.append(([t.endpoint for t in targets], timeout_s))
        return [
            ProbeResult(False, timeout_s, None, f"timeout after {timeout_s:g}s")
            if t.endpoint in dead
            else ProbeResult(True, 0.01, 401)
            for t in targets
        ]

    return probe_all


def test_dead_mirrors_are_left_out_in_order_with_one_warning_each(tmp_path: Path) -> None:
    calls: list[tuple[list[str], float]] = []
    out, warnings = leave_out_dead_mirrors(config(), Paths(tmp_path), probe_all=fake({B.endpoint}, calls))
    assert out.containerd.mirrors == (("docker.io", (A, C)), ("quay.io", (C,)))
    assert calls == [([A.endpoint, B.endpoint, C.endpoint, C.endpoint], 0.5)]  # all at once, one timeout
    assert warnings == (
        "containerd.mirrors.docker.io[1]: https://b/v2/hub not answering at apply time (timeout after 0.5s); "
        "left out of hosts.toml until it answers (nodeagent run puts it back)",
    )
    assert "secret" not in warnings[0]


def test_all_alive_returns_the_config_unchanged(tmp_path: Path) -> None:
    cfg = config()
    out, warnings = leave_out_dead_mirrors(cfg, Paths(tmp_path), probe_all=fake(set()))
    assert out is cfg and warnings == ()


def test_disabled_probes_nothing(tmp_path: Path) -> None:
    calls: list[tuple[list[str], float]] = []
    cfg = config(enabled=False)
    out, warnings = leave_out_dead_mirrors(cfg, Paths(tmp_path), probe_all=fake({A.endpoint}, calls))
    assert out is cfg and warnings == () and calls == []


def test_apply_does_not_write_a_mirror_that_is_dead_and_says_so(tmp_path: Path) -> None:
    """run_apply with the check (as commands/apply.py passes it), probes stood in for."""
    import functools
    import io

    from nodeagent.apply.facts import gather
    from nodeagent.apply.runner import run_apply

    cfg = Config(
        containerd=ContainerdConfig(
            restart_command=(),
            mirrors=(("docker.io", (A, C)),),
            mirror_health=MirrorHealthConfig(timeout=0.5),
        )
    )
    check = functools.partial(leave_out_dead_mirrors, probe_all=fake({A.endpoint}))
    report = run_apply(
        cfg,
        gather(Paths(tmp_path), cfg.containerd.hosts_dir),
        flavor="generic",
        out=io.StringIO(),
        restarter=lambda c: None,
        mirror_check=check,
    )
    assert report.ok, report.errors
    text = (tmp_path / "etc/containerd/certs.d/docker.io/hosts.toml").read_text()
    assert '[host."http://c:5000"]' in text and "mirror-a" not in text and "http://a:5000" not in text
    assert 'server = "https://registry-1.docker.io"' in text
    assert any(
        w.startswith("containerd.mirrors.docker.io[0]: http://a:5000 not answering") for w in report.warnings
    )


def test_credentials_are_resolved_into_the_mirrors_header_and_a_failure_leaves_it_out(tmp_path: Path) -> None:
    from nodeagent.config.model import MirrorCredentials
    from nodeagent.images.credentials import CredentialError

    good = Mirror("http://good:5000", credentials=MirrorCredentials("provider"))
    bad = Mirror("http://bad:5000", credentials=MirrorCredentials("file", path="/etc/x"))
    cfg = Config(containerd=ContainerdConfig(mirrors=(("docker.io", (good, bad, C)),)))
    seen: list[tuple[str, tuple[tuple[str, str], ...]]] = []

    def probe_all(targets: list[ProbeTarget], timeout_s: float) -> list[ProbeResult]:
        seen.extend((t.endpoint, t.headers) for t in targets)
        return [ProbeResult(True, 0.01, 200, "", True) for _ in targets]

    def fetch(m: Mirror) -> str:
        if m is bad:
            raise CredentialError("/etc/x: cannot read: No such file or directory")
        return "Basic Z29vZC1zZWNyZXQ="

    out, warnings = leave_out_dead_mirrors(cfg, Paths(tmp_path), probe_all=probe_all, fetch=fetch)
    ((_, mirrors),) = out.containerd.mirrors
    assert [m.endpoint for m in mirrors] == [good.endpoint, C.endpoint]
    assert mirrors[0].header == (("Authorization", ("Basic Z29vZC1zZWNyZXQ=",)),)
    assert seen[0] == (good.endpoint, (("Authorization", "Basic Z29vZC1zZWNyZXQ="),))  # probed with it
    assert warnings == (
        "containerd.mirrors.docker.io[1]: http://bad:5000: credentials unavailable (/etc/x: cannot read: "
        "No such file or directory); left out of hosts.toml until nodeagent run gets them",
    )


def test_a_mirror_refusing_its_credentials_is_left_out_and_mirror_only_keeps_all(tmp_path: Path) -> None:
    cfg = Config(
        containerd=ContainerdConfig(
            mirrors=(("docker.io", (A,)), ("quay.io", (A, C))), mirror_only=frozenset({"docker.io"})
        )
    )

    def probe_all(targets: list[ProbeTarget], timeout_s: float) -> list[ProbeResult]:
        return [ProbeResult(False, 0.01, 401, "HTTP 401: credentials refused", False) for _ in targets]

    out, warnings = leave_out_dead_mirrors(cfg, Paths(tmp_path), probe_all=probe_all)
    assert out.containerd.mirrors == (("docker.io", (A,)), ("quay.io", ()))
    assert "refuses its credentials at apply time (HTTP 401: credentials refused)" in warnings[0]
    assert warnings[-1].startswith("containerd.mirrors.docker.io: mirror-only and no mirror is usable now")
