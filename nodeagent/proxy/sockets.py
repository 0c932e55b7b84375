"""The proxy's listening unix socket: parent directory, stale-socket replacement, permissions."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

SOCKET_MODE = 0o660
DIR_MODE = 0o755
# listen() backlog: connections beyond it wait (connect blocks, or EAGAIN when non-blocking).
# Backlog= in systemd/nodeagent.socket is the same number: asyncio calls listen() again on a socket
# systemd passed, and would otherwise change it.
BACKLOG = 256


class SocketInUseError(RuntimeError):
    pass


def socket_answers(path: Path, timeout: float = 0.5) -> bool:
    """True if something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def prepare_socket_path(path: Path) -> None:
    """Create the parent directory; remove a stale socket left by a crashed run.

    Only a *socket* that nobody answers on is removed. A live socket (another nodeagent is
    serving) or anything that is not a socket (a file, a directory, a symlink) is left alone and
    reported, so a mistyped ``cri.proxySocket`` can never delete an unrelated file."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path}: exists and is not a socket; refusing to replace it")
    if socket_answers(path):
        raise SocketInUseError(
            f"{path}: another process is serving on this socket (another nodeagent, or systemd's "
            "nodeagent.socket listening for the service: start it with systemctl)"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def restrictive_umask(mask: int = 0o117) -> Iterator[None]:
    """Bind with the final permissions (no window where the socket is world-accessible)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def finish_socket(path: Path) -> None:
    try:
        os.chmod(path, SOCKET_MODE)
    except OSError as e:  # pragma: no cover - the socket was just created by us
        if e.errno != errno.ENOENT:
            raise


def remove_socket(path: Path) -> None:
    """Remove our socket at shutdown (only if it is still a socket)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
