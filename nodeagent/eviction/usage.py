"""How full the image filesystem is, measured with statvfs(2) at the moment of asking.

containerd's ImageFsInfo ``used_bytes`` is refreshed only every ``stats_collect_period`` (10 s by
default) and counts only the snapshotter's directory; statvfs is current and counts everything on
the filesystem, which is what makes a pull fail with ENOSPC. Like the kubelet, "used" is capacity
minus what an unprivileged writer can still use (``f_bavail``), so blocks reserved for root count
as used.

Which filesystem: ``eviction.imagefsPath`` when configured (a host path, through ``Paths``); else with
``containerd.snapshotter: soci`` SOCI's directory (``containerd.soci.root``, where it unpacks every
snapshot: containerd 2.x reports the same directory, containerd before 1.7.16 names a directory of
its own root that SOCI never writes to); else the mountpoint CRI ImageFsInfo reports for the image
filesystem (containerd: its snapshotter root).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nodeagent.config.model import Config
from nodeagent.eviction.policy import FsUsage
from nodeagent.util.paths import Paths

if TYPE_CHECKING:
    from nodeagent.cri.gen import cri_api_pb2 as pb
    from nodeagent.cri.runtime import ImageService


class UsageError(RuntimeError):
    """The image filesystem cannot be found or measured; the message names the path."""


def measure(path: Path) -> FsUsage:
    """Used and total bytes of the filesystem holding ``path`` (statvfs, current)."""
    try:
        st = os.statvfs(path)
    except OSError as e:
        raise UsageError(f"{path}: statvfs failed: {e.strerror}") from None
    total = st.f_blocks * st.f_frsize
    used = total - st.f_bavail * st.f_frsize
    return FsUsage(used_bytes=max(0, used), total_bytes=total)


def mountpoint_from_imagefs_info(response: pb.ImageFsInfoResponse) -> str:
    """The image filesystem's mountpoint from a CRI ImageFsInfoResponse ("" when it names none)."""
    for fs in response.image_filesystems:
        mp = fs.fs_id.mountpoint
        if mp:
            return mp
    return ""


def configured_path(config: Config) -> str:
    """The host path to measure without asking the runtime ("" when only the runtime knows):
    ``eviction.imagefsPath``, else SOCI's root directory when SOCI is CRI's snapshotter."""
    if config.eviction.imagefs_path:
        return config.eviction.imagefs_path
    if config.containerd.snapshotter == "soci":
        return config.containerd.soci.root
    return ""


def imagefs_path(paths: Paths, configured: str, mountpoint: str = "") -> Path:
    """The path to measure: ``eviction.imagefsPath`` under ``paths`` (``--root``), else the
    runtime's mountpoint as the runtime reports it (the runtime does not run under ``--root``, just
    as ``cri.endpoint`` is used as configured)."""
    if configured:
        try:
            return paths.host(configured)
        except ValueError as e:
            raise UsageError(f"eviction.imagefsPath: {e}") from None
    if not mountpoint:
        raise UsageError(
            "image filesystem unknown: CRI ImageFsInfo reported no mountpoint "
            "and eviction.imagefsPath is not set"
        )
    try:
        return Paths().host(mountpoint)  # validated: absolute, no '..'
    except ValueError as e:
        raise UsageError(f"ImageFsInfo fs_id.mountpoint: {e}") from None


class Imagefs:
    """The image filesystem of one runtime: where it is, found once, and how full it is now.

    The path is ``eviction.imagefsPath`` under ``--root`` when configured, else the mountpoint
    the runtime reports (CRI ImageFsInfo, asked once). A path that cannot be measured is forgotten,
    so the next ``measure`` looks it up again (the runtime may have moved it). Shared by the daemon's
    cache figures, the eviction loop and ``nodeagent evict --dry-run``.
    """

    def __init__(
        self, paths: Paths, configured: str, measure: Callable[[Path], FsUsage] | None = None
    ) -> None:
        self.paths = paths
        self.configured = configured
        self.path: Path | None = None
        self._measure = measure

    async def locate(self, cri: ImageService) -> Path:
        """The path to measure (looked up on the first call). Raises ``UsageError``, or the CRI
        client's error when ImageFsInfo fails."""
        if self.path is None:
            mountpoint = ""
            if not self.configured:
                mountpoint = mountpoint_from_imagefs_info(await cri.image_fs_info())
            self.path = imagefs_path(self.paths, self.configured, mountpoint)
        return self.path

    def measure_located(self) -> FsUsage | None:
        """statvfs of the path found before, without asking the runtime; None when not found yet.
        Raises ``UsageError``."""
        if self.path is None:
            return None
        return self._statvfs(self.path)

    async def measure(self, cri: ImageService) -> FsUsage:
        """Usage now (statvfs). Raises ``UsageError`` or the CRI client's error."""
        return self._statvfs(await self.locate(cri))

    def _statvfs(self, path: Path) -> FsUsage:
        try:
            return (self._measure or measure)(path)
        except UsageError:
            self.path = None
            raise
