"""A small ext4 filesystem on a loop device, for disk-pressure tests (image store on it).

fs = LoopFs(tmp / "disk", size_mb=200); fs.create()
Containerd(..., root_dir=fs.mountpoint / "root")
fs.destroy()       # unmount (lazily if still busy), detach the loop device, delete the image file
"""

from __future__ import annotations

import os
from pathlib import Path

from nodeagent.util import proc
from tests.sandbox.mounts import mounts_under
from tests.sandbox.process import SandboxError


class LoopFs:
    def __init__(self, workdir: Path, size_mb: int = 200) -> None:
        if size_mb < 8:
            raise ValueError("ext4 needs at least 8 MB")
        self.workdir = workdir
        self.image = workdir / "disk.img"
        self.mountpoint = workdir / "mnt"
        self.size_mb = size_mb
        self.mounted = False

    def create(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        with self.image.open("wb") as f:
            f.truncate(self.size_mb << 20)
        proc.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.image)], timeout=120)
        try:
            proc.run(["mount", "-o", "loop", str(self.image), str(self.mountpoint)], timeout=60)
        except proc.CommandError as e:
            raise SandboxError(f"loop mount of {self.image}: {e}") from None
        self.mounted = True
        return self.mountpoint

    def loop_devices(self) -> list[str]:
        r = proc.run(["losetup", "-j", str(self.image)], timeout=30, check=False)
        return [line.split(":", 1)[0] for line in r.stdout.decode().splitlines() if ":" in line]

    def usage(self) -> tuple[int, int]:
        """(used bytes, total bytes) as statvfs reports them."""
        st = os.statvfs(self.mountpoint)
        total = st.f_blocks * st.f_frsize
        return total - st.f_bfree * st.f_frsize, total

    def destroy(self) -> None:
        if mounts_under(self.mountpoint):
            r = proc.run(["umount", str(self.mountpoint)], timeout=60, check=False)
            if r.returncode != 0:
                proc.run(["umount", "-l", str(self.mountpoint)], timeout=60, check=False)
        self.mounted = False
        for dev in self.loop_devices():  # mount -o loop sets autoclear; this covers lazy unmounts
            proc.run(["losetup", "-d", dev], timeout=30, check=False)
        self.image.unlink(missing_ok=True)
