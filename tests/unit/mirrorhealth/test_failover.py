"""HostsFileWriter on a tmp hosts directory, with a stand-in renderer (the real one is apply's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeagent.config.model import ContainerdConfig, Mirror
from nodeagent.mirrorhealth.failover import HostsFileWriter, NotOwnedError
from nodeagent.util.paths import Paths, UnsafePathError

MARK = "# managed by nodeagent"
A = Mirror("http://mirror-a:5000")
B = Mirror("http://mirror-b:5000/")


def render(registry: str, active: tuple[Mirror, ...]) -> str:
    hosts = "".join(f'\n[host."{m.endpoint}"]\n  capabilities = ["pull", "resolve"]\n' for m in active)
    return f'{MARK}\nserver = "https://{registry}"\n{hosts}'


def writer(root: Path) -> HostsFileWriter:
    return HostsFileWriter(
        Paths(root),
        ContainerdConfig(hosts_dir="/etc/containerd/certs.d"),
        render=render,
        is_owned=lambda text: text.startswith(MARK),
    )


def hosts_file(root: Path, registry: str, text: str, mode: int = 0o640) -> Path:
    p = root / "etc/containerd/certs.d" / registry / "hosts.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    os.chmod(p, mode)
    return p


def test_rewrite_keeps_server_and_order_and_file_mode(tmp_path: Path) -> None:
    p = hosts_file(tmp_path, "docker.io", render("docker.io", (A, B)))
    w = writer(tmp_path)
    assert w.endpoints_in_file("docker.io") == frozenset({"http://mirror-a:5000", "http://mirror-b:5000"})
    assert w.write("docker.io", (B,)) is True
    assert p.read_text() == render("docker.io", (B,))
    assert p.stat().st_mode & 0o777 == 0o640
    assert w.write("docker.io", (B,)) is False  # unchanged: not touched again
    assert [x.name for x in p.parent.iterdir()] == ["hosts.toml"]  # no temp file left


def test_file_without_ownership_marker_is_never_touched(tmp_path: Path) -> None:
    text = 'server = "https://docker.io"\n[host."http://mirror-a:5000"]\n'
    p = hosts_file(tmp_path, "docker.io", text)
    before = p.stat().st_mtime_ns
    w = writer(tmp_path)
    assert w.endpoints_in_file("docker.io") is None
    with pytest.raises(NotOwnedError, match="no nodeagent ownership marker"):
        w.write("docker.io", ())
    assert p.read_text() == text and p.stat().st_mtime_ns == before


def test_missing_file_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(NotOwnedError, match="missing"):
        writer(tmp_path).write("quay.io", (A,))
    assert not (tmp_path / "etc/containerd/certs.d/quay.io").exists()


def test_registry_name_can_never_escape_the_hosts_dir(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError):
        writer(tmp_path).path("..")


def test_real_renderer_mirror_only_server_counts_and_a_header_makes_the_file_0600(tmp_path: Path) -> None:
    from nodeagent.apply.targets.mirrors import render_hosts_toml

    cd = ContainerdConfig(hosts_dir="/etc/containerd/certs.d", mirror_only=frozenset({"docker.io"}))
    p = hosts_file(tmp_path, "docker.io", render_hosts_toml("docker.io", (A,), mirror_only=True), 0o644)
    w = HostsFileWriter(Paths(tmp_path), cd)
    assert w.endpoints_in_file("docker.io") == frozenset({"http://mirror-a:5000"})
    secret = Mirror("http://mirror-b:5000", header=(("Authorization", ("Basic dG9rZW4=",)),))
    assert w.write("docker.io", (A, secret)) is True
    assert p.stat().st_mode & 0o777 == 0o600  # it holds a token now
    assert p.read_text() == render_hosts_toml("docker.io", (A, secret), mirror_only=True)
    assert 'server = "http://mirror-b:5000"' in p.read_text()
