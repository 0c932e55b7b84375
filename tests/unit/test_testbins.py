"""The test-binary cache's contract that tests rely on (the builds themselves run in setup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sandbox import testbins


def test_path_names_the_build_command_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEAGENT_TESTBIN_CACHE", str(tmp_path))
    with pytest.raises(testbins.TestbinMissing, match=r"testbins build kubelet"):
        testbins.path("kubelet")


def test_path_finds_a_cached_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEAGENT_TESTBIN_CACHE", str(tmp_path))
    s = testbins.spec("containerd")
    for b in s.binaries:
        f = tmp_path / s.key / "bin" / b
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("")
    assert testbins.path("containerd", "ctr") == tmp_path / s.key / "bin" / "ctr"
    assert testbins.path("containerd").name == "containerd"
    with pytest.raises(KeyError, match="no binary"):
        testbins.path("containerd", "kubelet")


def test_unknown_and_unavailable_entries_say_why() -> None:
    with pytest.raises(KeyError, match="known: crictl"):
        testbins.spec("dockerd")
    with pytest.raises(testbins.TestbinMissing, match="does not serve"):
        testbins.path("soci-snapshotter", "soci")


def test_go_names_a_major_version_package_after_its_parent() -> None:
    assert testbins._go_binary_name("go.etcd.io/etcd/server/v3") == "server"
    assert testbins._go_binary_name("k8s.io/kubernetes/cmd/kubelet") == "kubelet"
