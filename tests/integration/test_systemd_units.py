"""The unit files under systemd/, checked by systemd itself (systemd-analyze verify / security) in a
root made by ami/install.sh, so ExecStart points at the real installed entry point.

The kubelet unit there is a stand-in (a fake, shaped like AL2023's kubelet.service; /usr/bin/kubelet is
an empty script), so that the drop-in is verified as systemd would load it.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nodeagent.config.model import ImagesConfig
from tests.integration import boot_fixtures
from tests.integration.boot_fixtures import REPO

# shared session fixtures (a module, not a conftest, so they stay with the tests that use them)
wheel = boot_fixtures.wheel
installed_root = boot_fixtures.installed_root

pytestmark = pytest.mark.integration

UNITS = ("nodeagent-apply.service", "nodeagent-prefetch.service", "nodeagent.service")
SOCKETS = ("nodeagent.socket",)
MAX_EXPOSURE = {"nodeagent.service": 4.0, "nodeagent.socket": 4.0}

FAKE_KUBELET_UNIT = """\
# FAKE kubelet unit for tests (shape of AL2023's /etc/systemd/system/kubelet.service)
[Unit]
Description=Kubernetes Kubelet (test stand-in)
After=containerd.service
Wants=containerd.service

[Service]
ExecStart=/usr/bin/kubelet
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="module")
def unit_root(installed_root: Path) -> Path:
    """The installed root plus the OS's own units (sysinit.target, containerd.service, ...)."""
    lib = installed_root / "usr/lib/systemd/system"
    if not lib.exists():
        host = Path("/usr/lib/systemd/system")
        if not (host / "sysinit.target").exists():
            host = Path("/lib/systemd/system")
        shutil.copytree(host, lib, symlinks=True)
    (installed_root / "etc/systemd/system/kubelet.service").write_text(FAKE_KUBELET_UNIT)
    kubelet = installed_root / "usr/bin/kubelet"
    kubelet.parent.mkdir(parents=True, exist_ok=True)
    kubelet.write_text("#!/bin/sh\nexit 0\n")
    kubelet.chmod(0o755)
    return installed_root


def _analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args[:1], f"--root={root}", *args[1:]],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("unit", [*UNITS, *SOCKETS, "kubelet.service"])
def test_unit_verifies_clean(unit_root: Path, unit: str) -> None:
    r = _analyze(unit_root, "verify", unit)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # also no "Unknown key ... ignoring" warnings


def test_verify_catches_a_missing_entry_point(tmp_path: Path, unit_root: Path) -> None:
    """The check above can fail: without the installed binary systemd rejects the unit."""
    root = tmp_path / "root"
    shutil.copytree(unit_root / "usr/lib/systemd", root / "usr/lib/systemd", symlinks=True)
    shutil.copytree(unit_root / "etc/systemd", root / "etc/systemd", symlinks=True)
    r = _analyze(root, "verify", "nodeagent.service")
    assert r.returncode != 0
    assert "/opt/nodeagent/bin/nodeagent" in r.stderr


def _exposure(root: Path, unit: str) -> float:
    r = _analyze(root, "security", "--offline=yes", "--no-pager", unit)
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


def test_security_exposure(unit_root: Path) -> None:
    scores = {u: _exposure(unit_root, u) for u in (*UNITS, *SOCKETS)}
    print("\nsystemd-analyze security --offline=yes exposure:")
    for u, s in scores.items():
        print(f"  {u:30s} {s:.1f}")
    for u, limit in MAX_EXPOSURE.items():
        assert scores[u] <= limit, f"{u}: exposure {scores[u]} > {limit}"
    # Every unit is hardened, not only the daemon.
    assert all(s <= 4.0 for s in scores.values()), scores


def _unit(path: Path) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_kubelet_dropin_wants_and_orders_every_boot_unit_without_requiring_them() -> None:
    d = _unit(REPO / "systemd/kubelet.service.d/10-nodeagent.conf")
    assert set(d["Unit"]["Wants"].split()) == set(UNITS)
    assert set(d["Unit"]["After"].split()) == set(UNITS)
    # Requires=/BindsTo= would keep the kubelet down when a nodeagent step fails.
    assert not any(k in d["Unit"] for k in ("Requires", "BindsTo", "Requisite"))


def test_boot_order_around_nodeadm() -> None:
    apply = _unit(REPO / "systemd/nodeagent-apply.service")["Unit"]
    assert {"nodeadm-run.service", "kubelet.service"} <= set(apply["Before"].split())
    prefetch = _unit(REPO / "systemd/nodeagent-prefetch.service")
    assert "containerd.service" in prefetch["Unit"]["After"].split()
    assert "kubelet.service" in prefetch["Unit"]["Before"].split()
    # nodeadm-run starts the kubelet and waits for it: ordering prefetch after it would deadlock.
    assert "nodeadm-run.service" not in prefetch["Unit"]["After"]
    assert "Install" not in prefetch  # only the kubelet pulls it in
    daemon = _unit(REPO / "systemd/nodeagent.service")["Service"]
    assert (daemon["Type"], daemon["Restart"]) == ("notify", "always")
    assert int(daemon["WatchdogSec"]) > 0


def test_prefetch_is_bounded_by_its_budget() -> None:
    svc = _unit(REPO / "systemd/nodeagent-prefetch.service")["Service"]
    timeout = int(svc["TimeoutStartSec"])
    budget = ImagesConfig().prefetch_budget
    assert budget < timeout <= budget + 120, "the unit's backstop must sit just above the default budget"


def test_apply_is_not_ordered_before_containerd() -> None:
    """apply may run `systemctl restart containerd` (generic flavor): that job must not wait for apply."""
    apply = _unit(REPO / "systemd/nodeagent-apply.service")["Unit"]
    assert "containerd.service" not in apply["Before"].split()


def test_socket_unit_owns_the_default_proxy_socket_for_the_daemon() -> None:
    """nodeagent.socket listens on cri.proxySocket's default with the daemon's mode and backlog,
    names the fd the daemon looks for, and stays put while the service restarts."""
    from nodeagent.config.model import CriConfig
    from nodeagent.proxy import sockets
    from nodeagent.run.sd_daemon import PROXY_FDNAME

    sock = _unit(REPO / "systemd/nodeagent.socket")["Socket"]
    assert sock["ListenStream"] == CriConfig().proxy_socket
    assert int(sock["SocketMode"], 8) == sockets.SOCKET_MODE
    assert int(sock["DirectoryMode"], 8) == sockets.DIR_MODE
    assert int(sock["Backlog"]) == sockets.BACKLOG  # the daemon's listen() keeps it
    assert sock["FileDescriptorName"] == PROXY_FDNAME
    assert (sock["Accept"], sock["RemoveOnStop"], sock["Service"]) == ("no", "no", "nodeagent.service")
    assert not any(k.startswith("Exec") for k in sock)  # PID 1 holds the socket; nothing runs here
    svc = _unit(REPO / "systemd/nodeagent.service")
    assert svc["Service"]["Sockets"] == "nodeagent.socket"
    assert "nodeagent.socket" in svc["Unit"]["Wants"].split()
    assert "nodeagent.socket" in svc["Unit"]["After"].split()
    # Requires=/BindsTo= would stop metrics and eviction with the socket unit (the runbook stops it).
    assert not any(k in svc["Unit"] for k in ("Requires", "BindsTo", "Requisite"))
    # /run/nodeagent holds the socket: the service's RuntimeDirectory= must never remove it.
    assert svc["Service"]["RuntimeDirectory"] == "nodeagent"
    assert svc["Service"]["RuntimeDirectoryPreserve"] == "yes"
    # The memory bounds the daemon's own limits are measured against (docs/proxy.md).
    assert (svc["Service"]["MemoryHigh"], svc["Service"]["MemoryMax"]) == ("192M", "256M")


def test_verify_catches_a_socket_unit_without_its_service(tmp_path: Path, unit_root: Path) -> None:
    """The socket check above can fail: without nodeagent.service systemd rejects the socket unit."""
    root = tmp_path / "root"
    shutil.copytree(unit_root / "usr/lib/systemd", root / "usr/lib/systemd", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit_root / "etc/systemd/system/nodeagent.socket", root / "etc/systemd/system/")
    r = _analyze(root, "verify", "nodeagent.socket")
    assert r.returncode != 0
    assert "nodeagent.service" in r.stderr
