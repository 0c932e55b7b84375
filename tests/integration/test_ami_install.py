"""ami/install.sh and ami/cleanup.sh run into a temp root, the way Packer runs them on the build
instance (with --root /). The venv is real: built from the project's wheel with the system Python 3.11.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nodeagent.config import load
from tests.integration import boot_fixtures
from tests.integration.boot_fixtures import REPO, python311

# shared session fixtures (a module, not a conftest, so they stay with the tests that use them)
wheel = boot_fixtures.wheel
installed_root = boot_fixtures.installed_root

pytestmark = pytest.mark.integration
UNITS = ("nodeagent-apply.service", "nodeagent-prefetch.service", "nodeagent.service", "nodeagent.socket")


def test_install_builds_a_working_venv(installed_root: Path) -> None:
    exe = installed_root / "opt/nodeagent/bin/nodeagent"
    assert os.access(exe, os.X_OK)
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("nodeagent ")
    py = installed_root / "opt/nodeagent/bin/python"
    ver = subprocess.run(
        [str(py), "-c", "import sys; print(sys.version_info[:2] >= (3, 11))"], capture_output=True, text=True
    ).stdout
    assert ver.strip() == "True"


def test_install_writes_config_with_the_image_list(installed_root: Path) -> None:
    cfg = load(installed_root / "etc/nodeagent/config.yaml")
    listed = yaml.safe_load((REPO / "ami/images.yaml").read_text())["images"]
    assert [p.image for p in cfg.images.prefetch] == [x["image"] for x in listed["prefetch"]]
    assert [p.pin for p in cfg.images.prefetch] == [x["pin"] for x in listed["prefetch"]]
    assert cfg.images.protect == tuple(listed["protect"])
    assert (installed_root / "etc/nodeagent/config.yaml").stat().st_mode & 0o777 == 0o644
    assert list((installed_root / "etc/nodeagent").glob(".config.yaml.*")) == []


def test_install_places_and_enables_units(installed_root: Path) -> None:
    sd = installed_root / "etc/systemd/system"
    for u in UNITS:
        assert (sd / u).read_text() == (REPO / "systemd" / u).read_text()
    dropin = sd / "kubelet.service.d/10-nodeagent.conf"
    assert dropin.read_text() == (REPO / "systemd/kubelet.service.d/10-nodeagent.conf").read_text()
    wants = sd / "multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == ["nodeagent-apply.service", "nodeagent.service"]
    sockets = sd / "sockets.target.wants"
    assert sorted(p.name for p in sockets.iterdir()) == ["nodeagent.socket"]
    for link in [*wants.iterdir(), *sockets.iterdir()]:
        assert os.readlink(link) == f"/etc/systemd/system/{link.name}"  # valid on the real root


def test_install_refuses_a_missing_wheel_before_writing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    r = subprocess.run(
        ["bash", str(REPO / "ami/install.sh"), "--root", str(root), "--wheel", str(tmp_path / "missing.whl")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert "missing.whl: no such wheel" in r.stderr
    assert list(root.iterdir()) == []


def run_install(root: Path, wheel: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """ami/install.sh into ``root`` with ``wheel`` and Python 3.11, plus ``args``."""
    argv = ["bash", str(REPO / "ami/install.sh"), "--root", str(root), "--wheel", str(wheel)]
    return subprocess.run([*argv, *args, "--python", python311()], capture_output=True, text=True)


def test_install_rolls_back_on_a_bad_images_file(tmp_path: Path, wheel: Path, installed_root: Path) -> None:
    """A bad image list fails the install and leaves the previous install exactly as it was."""
    root = tmp_path / "root"
    shutil.copytree(installed_root, root, symlinks=True)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cfg_before = (root / "etc/nodeagent/config.yaml").read_bytes()
    bad = tmp_path / "images.yaml"
    bad.write_text("images:\n  - just-a-list\n")
    r = run_install(root, wheel, "--images", str(bad))
    assert r.returncode == 1
    assert f"{bad}: images: must be a mapping" in r.stderr
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    assert (root / "etc/nodeagent/config.yaml").read_bytes() == cfg_before


def test_install_into_an_empty_root_leaves_nothing_on_a_bad_config(tmp_path: Path, wheel: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    bad = tmp_path / "config.yaml"
    bad.write_text("- not\n- a mapping\n")
    r = run_install(root, wheel, "--config", str(bad))
    assert r.returncode == 1
    assert f"{bad}: top level must be a mapping" in r.stderr
    assert list(root.iterdir()) == []


def test_cleanup_removes_leftovers_and_keeps_baked_images(tmp_path: Path) -> None:
    root = tmp_path / "root"
    keep = [
        "etc/nodeagent/config.yaml",
        "etc/nodeagent/baked-images.json",
        "var/lib/containerd/io.containerd.content.v1.content/blobs/sha256/abc",
        "opt/nodeagent/bin/nodeagent",
        "var/log/dnf.rpm.log.keepme-dir/x",
    ]
    gone = [
        "var/lib/nodeagent/last-used.json",
        "var/lib/nodeagent/apply-report.json",
        "run/nodeagent/status.json",
        "tmp/nodeagent-build/ami/install.sh",
        "root/.cache/pip/http/x",
        "var/cache/dnf/repo/x",
        "var/log/journal/abc/system.journal",
        "var/log/cloud-init.log",
        "var/lib/cloud/instances/i-0123/obj.pkl",
        "etc/ssh/ssh_host_ed25519_key",
        "home/ec2-user/.bash_history",
    ]
    for p in keep + gone:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text("x")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    r = subprocess.run(
        ["bash", str(REPO / "ami/cleanup.sh"), "--root", str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    for p in keep:
        assert (root / p).exists(), p
    for p in gone:
        assert not (root / p).exists(), p
    assert (root / "var/lib/nodeagent").is_dir()  # the directory stays, its contents go
    assert (root / "etc/machine-id").read_text() == ""
    assert "kept /etc/nodeagent/baked-images.json" in r.stdout


def test_cleanup_refuses_a_build_dir_outside_tmp(tmp_path: Path) -> None:
    r = subprocess.run(
        ["bash", str(REPO / "ami/cleanup.sh"), "--root", str(tmp_path), "--build-dir", "/etc"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert "--build-dir must be under /tmp" in r.stderr


def _scripts() -> list[Path]:
    return sorted(p for d in ("ami", "bootstrap") for p in (REPO / d).rglob("*.sh") if (REPO / d).is_dir())


def test_scripts_are_shellcheck_clean_and_strict() -> None:
    scripts = _scripts()
    assert REPO / "ami/install.sh" in scripts and REPO / "ami/cleanup.sh" in scripts
    r = subprocess.run(["shellcheck", "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    for s in scripts:
        assert "set -euo pipefail" in s.read_text(), f"{s}: missing set -euo pipefail"
