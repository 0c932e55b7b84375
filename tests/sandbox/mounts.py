"""Mount bookkeeping: what is mounted under a directory, and unmounting it (deepest first)."""

from __future__ import annotations

from pathlib import Path

from nodeagent.util import proc


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path`` in this process's mount namespace, deepest first."""
    base = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == base or mp.startswith(base + "/"):
                found.append(Path(mp))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_all_under(path: Path) -> list[Path]:
    """Unmount everything at or below ``path`` (lazily if busy). Returns what was unmounted."""
    done = []
    for mp in mounts_under(path):
        r = proc.run(["umount", str(mp)], timeout=30, check=False)
        if r.returncode != 0:
            proc.run(["umount", "-l", str(mp)], timeout=30, check=False)
        done.append(mp)
    return done
