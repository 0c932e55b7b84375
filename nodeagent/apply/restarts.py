"""Restarting what ``nodeagent apply`` changed (generic flavor): containerd with
``containerd.restartCommand``, then CRI Version must answer within ``HEALTH_TIMEOUT`` or the previous
config is restored and containerd restarted again; soci-snapshotter-grpc with
``containerd.soci.restartCommand``, then its socket must accept connections. The default commands
never run for a ``--root`` tree (they would restart this host's daemons, not the tree's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nodeagent.apply.facts import NodeFacts
from nodeagent.config.model import Config, ContainerdConfig, SociConfig
from nodeagent.util.atomicio import remove_durably, write_atomic
from nodeagent.util.backoff import Backoff

if TYPE_CHECKING:
    from nodeagent.apply.runner import ApplyReport

DEFAULT_RESTART_COMMAND = ContainerdConfig().restart_command
RESTART_TIMEOUT = 120.0  # the restart command itself
HEALTH_TIMEOUT = 30.0  # CRI Version must answer within this after a restart
HEALTH_POLL = Backoff(0.5, cap=0.5, factor=1.0)  # ask CRI Version every 0.5 s until then


Restarter = Callable[[Config], str | None]  # returns None when containerd is healthy, else why not


def cri_healthy(endpoint: str, timeout: float = HEALTH_TIMEOUT) -> str | None:
    """None once CRI Version answers on ``endpoint``; the last error after ``timeout`` seconds."""
    import asyncio

    from nodeagent.cri.client import CriClient  # grpc is imported only when a restart happens

    async def once() -> None:
        async with CriClient(endpoint, timeout=2.0) as c:
            await c.version()

    deadline = time.monotonic() + timeout
    last = "no answer"
    delays = HEALTH_POLL.delays()
    while True:
        try:
            asyncio.run(once())
            return None
        except Exception as e:
            last = str(e)[:300]
        if time.monotonic() >= deadline:
            return f"CRI Version on {endpoint} did not answer within {timeout:g}s: {last}"
        time.sleep(next(delays))


def restart_containerd(config: Config) -> str | None:
    from nodeagent.util import proc

    argv = config.containerd.restart_command
    if not argv:
        return "containerd.restartCommand is empty"
    try:
        proc.run(argv, timeout=RESTART_TIMEOUT)
    except proc.CommandError as e:
        return f"restart command failed: {e}"
    return cri_healthy(config.cri.endpoint)


def restart_with_rollback(
    config: Config,
    path: Path,
    previous: bytes | None,
    previous_mode: int | None,
    restarter: Restarter,
    report: ApplyReport,
) -> None:
    problem = restarter(config)
    if problem is None:
        report.containerd_restarted = True
        return
    if previous is None:
        remove_durably(path)
    else:
        write_atomic(path, previous, mode=previous_mode or 0o644)
    if str(path) in report.changed:
        report.changed.remove(str(path))
    again = restarter(config)
    tail = "containerd is healthy on it" if again is None else "containerd is still not healthy on it"
    report.errors.append(
        f"containerd: not healthy after the config change ({problem}); previous {path} restored, {tail}"
    )


def restart_soci(config: Config, facts: NodeFacts, report: ApplyReport) -> None:
    """Restart soci-snapshotter-grpc after its config changed (before containerd's restart), and
    wait until its socket accepts connections."""
    from nodeagent.util import proc

    sc = config.containerd.soci
    argv = sc.restart_command
    if not argv:
        report.warnings.append("soci-snapshotter config changed but containerd.soci.restartCommand is empty")
        return
    if argv == SociConfig().restart_command and facts.paths.root != Path("/"):
        report.warnings.append(
            f"soci-snapshotter config changed but --root is {facts.paths.root} and the default "
            "restartCommand would restart this host's soci-snapshotter: restart it to use the config"
        )
        return
    try:
        proc.run(argv, timeout=RESTART_TIMEOUT)
    except proc.CommandError as e:
        report.errors.append(f"soci: restart command failed: {e}")
        return
    sock = Path(sc.address)  # the restarted daemon's socket on this host (not a file of the --root tree)
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while True:
        if _unix_connects(sock):
            report.notes.append(f"soci-snapshotter restarted and serving on {sc.address}")
            return
        if time.monotonic() > deadline:
            report.errors.append(
                f"soci: soci-snapshotter-grpc does not accept connections on {sc.address} "
                f"{HEALTH_TIMEOUT:.0f}s after restartCommand"
            )
            return
        time.sleep(0.2)


def _unix_connects(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def restart_skip_reason(config: Config, facts: NodeFacts) -> str | None:
    """Why the configured restart must not run, or None. The default command restarts the host's
    containerd, which is not the one reading a ``--root`` tree's files (image builds, tests)."""
    argv = config.containerd.restart_command
    if not argv:
        return "containerd.restartCommand is empty"
    if argv == DEFAULT_RESTART_COMMAND and facts.paths.root != Path("/"):
        return (
            f"--root is {facts.paths.root} and the default restartCommand would restart "
            "this host's containerd"
        )
    return None
