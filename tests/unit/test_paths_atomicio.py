import os
from pathlib import Path

import pytest

from nodeagent.util.atomicio import remove_durably, write_atomic
from nodeagent.util.paths import Paths, UnsafePathError, child


def test_paths_are_rooted(tmp_path: Path) -> None:
    p = Paths(tmp_path)
    assert p.config_file == tmp_path / "etc/nodeagent/config.yaml"
    assert p.host("/etc/containerd/certs.d") == tmp_path / "etc/containerd/certs.d"


@pytest.mark.parametrize("bad", ["relative/x", "/etc/../../x", "/a/.."])
def test_host_rejects_escapes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnsafePathError):
        Paths(tmp_path).host(bad)


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "../etc", "x\x00y"])
def test_child_rejects_unsafe_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnsafePathError):
        child(tmp_path, bad)


def test_write_atomic_reports_change_and_skips_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.conf"
    assert write_atomic(target, "a\n", mode=0o600) is True
    assert target.read_text() == "a\n"
    assert target.stat().st_mode & 0o777 == 0o600
    mtime = target.stat().st_mtime_ns
    os.utime(target, ns=(mtime - 10_000_000_000, mtime - 10_000_000_000))
    before = target.stat().st_mtime_ns
    assert write_atomic(target, "a\n", mode=0o600) is False
    assert target.stat().st_mtime_ns == before
    assert write_atomic(target, "b\n", mode=0o600) is True
    assert target.read_text() == "b\n"
    assert [p.name for p in target.parent.iterdir()] == ["f.conf"]  # no temp files left


def test_remove_durably(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("1")
    assert remove_durably(f) is True
    assert remove_durably(f) is False
