"""`nodeagent apply` as the boot unit runs it (a separate process, IMDS address from the environment, as a
systemd Environment= line would set it), against a FAKE IMDSv2 on loopback (tests/fakes/imds.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.eks.userdata import render_al2023
from tests.fakes.imds import FakeImds
from tests.unit.commands.test_apply_imds import BAKED, PART, node

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def apply_process(root: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NODEAGENT_IMDS_ENDPOINT": endpoint, "PYTHONPATH": str(REPO)}
    env.pop("NODEAGENT_IMDS", None)
    return subprocess.run(
        [sys.executable, "-m", "nodeagent", "apply", "--root", str(root), "--flavor", "eks-al2023"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_part_from_imds_reaches_the_nodeadm_dropin(tmp_path: Path) -> None:
    root = node(tmp_path, "n", BAKED)
    with FakeImds(render_al2023(PART).encode()) as fake:
        cp = apply_process(root, fake.endpoint)
    assert cp.returncode == 0, cp.stderr
    assert [p for m, p, s in fake.requests if s == 200] == ["/latest/api/token", "/latest/user-data"]
    dropin = (root / "etc/eks/nodeadm.d/90-nodeagent.yaml").read_text()
    assert "registryPullQPS: 50" in dropin  # from the user-data part, not the baked 10
    assert (root / "etc/containerd/certs.d/ghcr.io/hosts.toml").exists()


def test_imds_down_process_falls_back_to_the_baked_config(tmp_path: Path) -> None:
    # within how long (against the IMDS deadline, the process with IMDS off as baseline): bench_imds_fallback
    root = node(tmp_path, "n", BAKED)
    with FakeImds(b"") as fake:
        fake.hang = True
        cp = apply_process(root, fake.endpoint)
    assert cp.returncode == 0, cp.stderr
    assert "IMDS unreachable after" in cp.stderr
    report = json.loads((root / "var/lib/nodeagent/apply-report.json").read_text())
    assert any("IMDS unreachable" in w for w in report["warnings"])
    assert "registryPullQPS: 10" in (root / "etc/eks/nodeadm.d/90-nodeagent.yaml").read_text()
