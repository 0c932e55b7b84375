"""`nodeagent apply --root T` with the node group's settings in user-data, served by a FAKE IMDSv2 on
loopback (tests/fakes/imds.py; never the real 169.254.169.254)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from nodeagent.cli import main
from nodeagent.eks.userdata import render_al2023
from tests.fakes.imds import FakeImds
from tests.unit.targets.helpers import DATA, HEADER

BAKED = (
    HEADER
    + """kubelet:
  registryPullQPS: 10
containerd:
  restartCommand: []
  mirrors:
    docker.io:
      - endpoint: https://baked-mirror.example.com
images:
  protect: ["public.ecr.aws/eks-distro/*"]
"""
)
PART = (
    HEADER
    + """kubelet:
  registryPullQPS: 50
  maxParallelImagePulls: 7
containerd:
  mirrors:
    docker.io:
      - endpoint: https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub
        overridePath: true
    ghcr.io:
      - endpoint: https://ghcr-mirror.example.com
"""
)
# what the merge rules (docs/eks.md) make of BAKED + PART, written by hand
MERGED = (
    HEADER
    + """kubelet:
  registryPullQPS: 50
  maxParallelImagePulls: 7
containerd:
  restartCommand: []
  mirrors:
    docker.io:
      - endpoint: https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub
        overridePath: true
    ghcr.io:
      - endpoint: https://ghcr-mirror.example.com
images:
  protect: ["public.ecr.aws/eks-distro/*"]
"""
)


def node(tmp_path: Path, name: str, config: str) -> Path:
    root = tmp_path / name
    (root / "etc/nodeagent").mkdir(parents=True)
    (root / "etc/nodeagent/config.yaml").write_text(config)
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        (DATA / "containerd-1.6-config-default.toml").read_text()
    )
    return root


def written(root: Path) -> dict[str, bytes]:
    """Every file apply wrote (not its own input, not its report), by path relative to the root."""
    skip = {"etc/nodeagent/config.yaml", "var/lib/nodeagent/apply-report.json", "etc/containerd/config.toml"}
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = str((Path(dirpath) / f).relative_to(root))
            if rel not in skip:
                out[rel] = (Path(dirpath) / f).read_bytes()
    return out


def report(root: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / "var/lib/nodeagent/apply-report.json").read_text())
    return data


def apply(root: Path, *extra: str) -> int:
    return main(["apply", "--root", str(root), "--flavor", "eks-al2023", *extra])


def test_user_data_gives_the_same_files_as_the_merged_config(tmp_path: Path) -> None:
    via_imds = node(tmp_path, "imds", BAKED)
    direct = node(tmp_path, "direct", MERGED)
    with FakeImds(render_al2023(PART).encode()) as fake:
        assert apply(via_imds, "--imds-endpoint", fake.endpoint) == 0  # auto: eks-al2023 flavor
    assert apply(direct, "--imds", "off") == 0
    files = written(via_imds)
    assert "etc/containerd/certs.d/ghcr.io/hosts.toml" in files  # the part's registry is there
    assert files == written(direct)
    assert report(via_imds)["result"] == "ok"
    # and the part really changed something compared with the baked config alone
    baked_only = node(tmp_path, "baked", BAKED)
    assert apply(baked_only, "--imds", "off") == 0
    assert written(baked_only) != files


def test_imds_down_applies_baked_config_in_bounded_time_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = node(tmp_path, "down", BAKED)
    baked_only = node(tmp_path, "baked", BAKED)
    with FakeImds(b"") as fake:
        fake.hang = True  # accepts, never answers: the slowest way for IMDS to be down
        t0 = time.monotonic()
        rc = apply(down, "--imds-endpoint", fake.endpoint)
        took = time.monotonic() - t0
    assert rc == 0
    assert took < 5.0 + 1.0  # the IMDS deadline (5 s) plus apply itself
    err = capsys.readouterr().err
    assert "warning: IMDS unreachable after" in err and "using the baked config" in err
    warnings = report(down)["warnings"]
    assert isinstance(warnings, list) and any("IMDS unreachable" in w for w in warnings)
    assert apply(baked_only, "--imds", "off") == 0
    assert written(down) == written(baked_only)


@pytest.mark.parametrize(
    ("user_data", "message"),
    [
        (b"Content-Type: multipart/mixed\n\n--x\nnot mime at all", "not a valid MIME multi-part document"),
        (render_al2023("kubelet: {registryPullQPS: [1, 2\n").encode(), "invalid YAML"),
        (
            render_al2023(PART.replace("registryPullQPS: 50", "registryPullQPS: lots")).encode(),
            "kubelet.registryPullQPS: expected an integer",
        ),
    ],
)
def test_bad_user_data_exit_1_baked_config_applied_error_kept_for_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], user_data: bytes, message: str
) -> None:
    bad = node(tmp_path, "bad", BAKED)
    baked_only = node(tmp_path, "baked", BAKED)
    with FakeImds(user_data) as fake:
        assert apply(bad, "--imds-endpoint", fake.endpoint) == 1
    assert message in capsys.readouterr().err
    r = report(bad)
    assert r["result"] == "failed"
    errors = r["errors"]
    assert isinstance(errors, list) and any(message in e and "baked config" in e for e in errors)
    assert apply(baked_only, "--imds", "off") == 0
    assert written(bad) == written(baked_only)  # the node still gets its baked settings, all of them
    assert not [p for p in written(bad) if p.endswith(".tmp")]  # nothing half-written

    # later, `nodeagent status` shows it (and is degraded: exit 1)
    capsys.readouterr()
    assert main(["status", "--json", "--root", str(bad)]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any(p.startswith("apply: ") and message in p for p in problems)
