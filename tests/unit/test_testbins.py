"""The test-binary cache's contract that tests rely on (the builds themselves run in setup)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.sandbox import testbins
from tests.sandbox.containerd import LINES


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


def test_unknown_and_unavailable_entries_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match="known: crictl"):
        testbins.spec("dockerd")
    gone = dataclasses.replace(testbins.spec("crictl"), unavailable="the proxy does not serve it")
    monkeypatch.setitem(testbins.SPECS, "crictl", gone)
    with pytest.raises(testbins.TestbinMissing, match="does not serve"):
        testbins.path("crictl")


SOCI_CMD_GOMOD = """module github.com/awslabs/soci-snapshotter/cmd

require github.com/awslabs/soci-snapshotter v0.0.0-local

replace (
	// Import local packages.
	github.com/awslabs/soci-snapshotter v0.0.0 => ../
	github.com/awslabs/soci-snapshotter v0.0.0-local => ../

	// Temporary fork
	github.com/hashicorp/golang-lru => github.com/ktock/golang-lru v0.5.5-0.20211029085301-ec551be6f75c
)

replace cyphar.com/go-pathrs => github.com/cyphar/libpathrs/go-pathrs v0.2.1
"""


def test_upstream_replaces_keep_module_targets_and_drop_local_directories() -> None:
    # soci-snapshotter's cmd module (as the proxy serves it) points the library at ../, which a
    # module from the proxy does not have; its other replaces must be kept for the build to match.
    assert testbins.upstream_replace_lines(SOCI_CMD_GOMOD) == [
        "github.com/hashicorp/golang-lru => github.com/ktock/golang-lru v0.5.5-0.20211029085301-ec551be6f75c",
        "cyphar.com/go-pathrs => github.com/cyphar/libpathrs/go-pathrs v0.2.1",
    ]
    soci = testbins.spec("soci-snapshotter")
    assert soci.module == "github.com/awslabs/soci-snapshotter/cmd" and soci.upstream_replaces
    assert any(r.endswith(f"github.com/awslabs/soci-snapshotter {testbins.SOCI}") for r in soci.replaces)
    assert soci.binaries == ("soci-snapshotter-grpc", "soci")


def test_go_names_a_major_version_package_after_its_parent() -> None:
    assert testbins._go_binary_name("go.etcd.io/etcd/server/v3") == "server"
    assert testbins._go_binary_name("k8s.io/kubernetes/cmd/kubelet") == "kubelet"


def test_containerd_line_names_are_the_pinned_minors() -> None:
    for ln in LINES.values():
        if ln.testbin is not None:
            version = testbins.spec(ln.testbin).version
            assert ln.name == ".".join(version.lstrip("v").split(".")[:2]), (ln, version)


def test_an_entry_built_another_way_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEAGENT_TESTBIN_CACHE", str(tmp_path))
    s = testbins.spec("crictl")
    (tmp_path / s.key / "bin").mkdir(parents=True)
    (tmp_path / s.key / "bin" / "crictl").write_text("")
    assert not testbins.is_cached(s)  # no BUILD.json: an interrupted or foreign directory
    (tmp_path / s.key / "BUILD.json").write_text(json.dumps({"recipe": testbins.recipe(s)}))
    assert testbins.is_cached(s)
    other = dataclasses.replace(s, tags=("netgo",))
    assert testbins.recipe(other) != testbins.recipe(s) and not testbins.is_cached(other)
