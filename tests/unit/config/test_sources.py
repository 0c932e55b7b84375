"""Config sources: baked file + user-data part from a FAKE IMDSv2 on loopback (never 169.254.169.254)."""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import pytest

from nodeagent import config
from nodeagent.config.sources import LoadedConfig, imds_enabled, load_for_command, merge
from nodeagent.eks.imds import ImdsClient, ImdsSettings
from nodeagent.eks.userdata import render_al2023
from nodeagent.util.paths import Paths
from tests.fakes.imds import FakeImds

BAKED = """apiVersion: nodeagent.io/v1alpha1
kind: NodeAgentConfig
kubelet:
  registryPullQPS: 10
  registryBurst: 20
containerd:
  mirrors:
    docker.io:
      - endpoint: https://mirror.example.com
    ghcr.io:
      - endpoint: https://ghcr-mirror.example.com
images:
  protect: ["public.ecr.aws/eks-distro/*"]
"""

PART = """apiVersion: nodeagent.io/v1alpha1
kind: NodeAgentConfig
kubelet:
  registryPullQPS: 50
containerd:
  mirrors:
    docker.io:
      - endpoint: https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub
        overridePath: true
images:
  protect: ["registry.k8s.io/*"]
"""


def args(root: Path, **kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "config": None,
        "root": str(root),
        "flavor": "auto",
        "imds": None,
        "imds_endpoint": None,
    }
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc/nodeagent").mkdir(parents=True)
    (tmp_path / "etc/nodeagent/config.yaml").write_text(BAKED)
    return tmp_path


def load(root: Path, fake: FakeImds | None, **kw: object) -> LoadedConfig:
    env = {"NODEAGENT_IMDS": "on", "NODEAGENT_IMDS_ENDPOINT": fake.endpoint if fake else "http://127.0.0.1:9"}
    return load_for_command(args(root, **kw), Paths.at(root), env=env)


# --- merge rules ---------------------------------------------------------------------------------------
def test_maps_merge_lists_replace_none_deletes() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "m": {"r1": [1], "r2": [2]}, "k": 1}
    over = {"a": {"y": [3]}, "m": {"r1": [9], "r3": [3]}, "k": None}
    assert merge(base, over) == {"a": {"x": 1, "y": [3]}, "m": {"r1": [9], "r2": [2], "r3": [3]}}
    assert base["k"] == 1  # inputs untouched


def test_user_data_part_merged_over_baked(root: Path) -> None:
    with FakeImds(render_al2023(PART).encode()) as fake:
        loaded = load(root, fake)
    c = loaded.config
    assert c.kubelet.registry_pull_qps == 50  # from user-data
    assert c.kubelet.registry_burst == 20  # baked, untouched by the part
    mirrors = dict(c.containerd.mirrors)
    assert [m.endpoint for m in mirrors["docker.io"]] == [
        "https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub"
    ]  # per-registry replace
    assert [m.endpoint for m in mirrors["ghcr.io"]] == ["https://ghcr-mirror.example.com"]  # kept
    assert c.images.protect == ("registry.k8s.io/*",)  # lists replace
    assert loaded.sources[-1] == "imds:user-data"
    assert not loaded.warnings and loaded.userdata_error is None


def test_merged_equals_loading_the_merged_file_directly(root: Path) -> None:
    with FakeImds(gzip.compress(render_al2023(PART).encode())) as fake:
        via_imds = load(root, fake).config
    merged_text = (
        BAKED.replace("registryPullQPS: 10", "registryPullQPS: 50")
        .replace(
            "      - endpoint: https://mirror.example.com\n",
            "      - endpoint: https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub\n"
            "        overridePath: true\n",
        )
        .replace('["public.ecr.aws/eks-distro/*"]', '["registry.k8s.io/*"]')
    )
    assert via_imds == config.load_text(merged_text)


@pytest.mark.parametrize("user_data", [None, b"#!/bin/bash\necho hi\n", render_al2023("").encode()])
def test_no_user_data_or_no_part_is_baked_alone(root: Path, user_data: bytes | None) -> None:
    with FakeImds(user_data) as fake:
        loaded = load(root, fake)
    assert loaded.config == config.load_text(BAKED)
    assert not loaded.warnings and loaded.userdata_error is None


# --- IMDS down ------------------------------------------------------------------------------------------
def test_imds_refused_falls_back_and_says_so(root: Path) -> None:
    # how fast: bench/bench_imds_fallback.py
    loaded = load(root, None)
    assert loaded.config == config.load_text(BAKED)
    (warning,) = loaded.warnings
    assert "IMDS unreachable after" in warning and "baked config" in warning
    assert loaded.userdata_error is None


def test_imds_hung_bounded_by_deadline(root: Path) -> None:
    def quick(settings: ImdsSettings) -> ImdsClient:
        return ImdsClient(ImdsSettings(endpoint=settings.endpoint, request_timeout=0.2, deadline=0.5))

    with FakeImds(b"") as fake:
        fake.hang = True
        env = {"NODEAGENT_IMDS": "on", "NODEAGENT_IMDS_ENDPOINT": fake.endpoint}
        loaded = load_for_command(args(root), Paths.at(root), env=env, client_factory=quick)
    assert loaded.config == config.load_text(BAKED)
    assert loaded.imds_seconds is not None  # measured and reported (bench/bench_imds_fallback.py: how long)
    assert "unreachable" in loaded.warnings[0]


# --- bad user-data ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("user_data", "message"),
    [
        (
            render_al2023("kubelet: {registryPullQPS: [1, 2\n").encode(),
            "user-data part 1 (application/nodeagent.yaml): invalid YAML: expected ',' or ']'",
        ),
        (render_al2023("- a\n- b\n").encode(), "top level must be a mapping"),
        (render_al2023("eviction:\n  interval: soon\n").encode(), "user-data merged over"),
        (
            render_al2023(PART.replace("interval", "x") + "eviction:\n  interval: soon\n").encode(),
            "user-data part 1 (application/nodeagent.yaml)",
        ),
        (
            render_al2023("kubelet:\n  registryPullQPS: lots\n").encode(),
            "kubelet.registryPullQPS: expected an integer, got a string",
        ),
        (
            render_al2023(PART.replace("registryPullQPS: 50", "registryPullQPS: lots")).encode(),
            "user-data part 1 (application/nodeagent.yaml): kubelet.registryPullQPS: expected an integer, "
            "got a string 'lots' (line 4)",
        ),
        (b"\x1f\x8b\x08\x00broken", "gzip data is"),
        (b"# application/nodeagent.yaml\nkubelet: {}\n", "not a MIME multi-part document"),
    ],
)
def test_bad_user_data_reported_and_baked_config_used(root: Path, user_data: bytes, message: str) -> None:
    with FakeImds(user_data) as fake:
        loaded = load(root, fake)
    assert loaded.config == config.load_text(BAKED)
    err = loaded.userdata_error
    assert err is not None and message in err
    assert "using the baked config" in err and str(root / "etc/nodeagent/config.yaml") in err


def test_bad_baked_config_raises(root: Path) -> None:
    (root / "etc/nodeagent/config.yaml").write_text("eviction:\n  interval: soon\n")
    with pytest.raises(config.ConfigError):
        load(root, None)


# --- when IMDS is asked at all -------------------------------------------------------------------------
class _Refuse(ImdsClient):
    def __init__(self, settings: ImdsSettings) -> None:
        raise AssertionError("IMDS must not be contacted")


@pytest.mark.parametrize(
    ("flavor", "imds", "env", "nodeadm", "expected"),
    [
        ("auto", None, {}, False, False),
        ("auto", None, {}, True, True),
        ("eks-al2023", None, {}, False, True),
        ("generic", None, {}, True, False),
        ("generic", "on", {}, False, True),
        ("eks-al2023", None, {"NODEAGENT_IMDS": "off"}, True, False),
        ("eks-al2023", "off", {"NODEAGENT_IMDS": "on"}, True, False),
    ],
)
def test_imds_enabled(
    root: Path, flavor: str, imds: str | None, env: dict[str, str], nodeadm: bool, expected: bool
) -> None:
    if nodeadm:
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/nodeadm").write_text("")
    env = {**env, "NODEAGENT_IMDS_ENDPOINT": "http://127.0.0.1:9"}  # a test tree needs an explicit endpoint
    assert imds_enabled(args(root, flavor=flavor, imds=imds), Paths.at(root), env) is expected


@pytest.mark.parametrize("flavor", ["auto", "eks-al2023"])
def test_auto_under_a_test_root_needs_an_explicit_endpoint(root: Path, flavor: str) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/nodeadm").write_text("")
    a = args(root, flavor=flavor)
    assert imds_enabled(a, Paths.at(root), {}) is False  # never the real 169.254.169.254 from a test tree
    assert imds_enabled(a, Paths.at(root), {"NODEAGENT_IMDS_ENDPOINT": "http://127.0.0.1:9"}) is True
    a.imds_endpoint = "http://127.0.0.1:9"
    assert imds_enabled(a, Paths.at(root), {}) is True


def test_disabled_never_contacts_imds(root: Path) -> None:
    loaded = load_for_command(args(root, imds="off"), Paths.at(root), env={}, client_factory=_Refuse)
    assert loaded.imds_seconds is None and loaded.sources == (str(root / "etc/nodeagent/config.yaml"),)


def test_bad_mode_value(root: Path) -> None:
    with pytest.raises(config.ConfigError, match="NODEAGENT_IMDS: must be on, off or auto"):
        load_for_command(args(root), Paths.at(root), env={"NODEAGENT_IMDS": "yes"})
