"""packer.json checked by Debian's Packer (1.6.6). `packer validate` is the full check here: it prepares
the amazon-ebs builder and every provisioner (no AWS call is made before `build`), so bad keys, bad
values and missing upload sources fail it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration import boot_fixtures
from tests.integration.boot_fixtures import REPO

pytestmark = pytest.mark.integration

wheel = boot_fixtures.wheel


def _validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["packer", "validate", *args, "packer.json"], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_packer_template_validates(wheel: Path) -> None:
    r = _validate("-var", f"wheel={wheel}")
    assert r.returncode == 0, r.stdout + r.stderr


def test_packer_validate_checks_the_uploads(wheel: Path, tmp_path: Path) -> None:
    """The check above is not vacuous: a missing wheel or images file fails validation. Without
    ``-var wheel=...`` the message names the variable (a required variable), as the README says."""
    r = _validate()
    assert r.returncode != 0 and "required variable not set: wheel" in r.stdout + r.stderr
    assert "packer validate -var wheel=" in (REPO / "README.md").read_text()
    r = _validate("-var", f"wheel={wheel}", "-var", f"images_file={tmp_path / 'nope.yaml'}")
    assert r.returncode != 0 and "nope.yaml" in r.stdout + r.stderr


def test_source_ami_is_the_latest_eks_al2023_image() -> None:
    t = json.loads((REPO / "packer.json").read_text())
    (b,) = t["builders"]
    assert b["type"] == "amazon-ebs"
    f = b["source_ami_filter"]
    assert f["most_recent"] is True
    assert f["owners"] == ["{{user `source_ami_owner`}}"]
    assert t["variables"]["source_ami_owner"] == "602401143452"  # Amazon EKS AMI account
    assert (
        f["filters"]["name"]
        == "amazon-eks-node-al2023-{{user `arch`}}-standard-{{user `kubernetes_version`}}-v*"
    )
    assert {"region", "instance_type", "kubernetes_version", "arch", "images_file", "wheel"} <= set(
        t["variables"]
    )
    assert t["variables"]["wheel"] is None  # required: packer names it when it is not given


def test_provisioners_install_bake_and_clean_up_in_order() -> None:
    t = json.loads((REPO / "packer.json").read_text())
    steps = "\n".join(
        "\n".join(p.get("inline", [])) if p["type"] == "shell" else f"upload {p['source']}"
        for p in t["provisioners"]
    )
    order = [
        "upload {{user `wheel`}}",
        "upload ami/",
        "upload {{user `images_file`}}",
        "ami/install.sh",
        "systemctl start containerd.service",
        "nodeagent prefetch --bake",
        "ami/cleanup.sh",
    ]
    positions = [steps.index(s) for s in order]
    assert positions == sorted(positions), steps
