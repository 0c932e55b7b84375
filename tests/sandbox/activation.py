"""systemd's part in socket activation, played by the harness (the sandbox has no systemd as PID 1).

    held = HeldSocket(path)                       # what nodeagent.socket does: bind (0660), listen, keep
    argv, env, fds = held.launch(argv, env)        # the daemon under systemd-socket-activate, given it
    held.wake()                                    # start it now, as systemd starts the enabled service
    held.close()                                   # stop the "socket unit"

The socket stays open here for as long as the ``HeldSocket`` lives, across any number of daemon
processes: connections made while no daemon runs wait in its backlog.

``systemd-socket-activate`` (Debian's systemd package) passes the sockets it received through
``LISTEN_FDS`` on to the daemon at their positions (fd 3 on); without ``--accept`` it waits for the
first connection attempt on them, then execs the daemon in its own process (same PID), with
``LISTEN_PID`` set to it, ``LISTEN_FDS`` and (``--fdname``) ``LISTEN_FDNAMES``. Only ``TERM``,
``PATH``, ``USER``, ``HOME`` and ``-E`` variables reach the daemon. A bash wrapper moves the
socket to fd 3 and sets ``LISTEN_PID`` to its own PID, which ``exec`` keeps.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from nodeagent.proxy import sockets
from nodeagent.run.sd_daemon import PROXY_FDNAME
from tests.sandbox.process import SandboxError

PASSED_THROUGH = ("TERM", "PATH", "USER", "HOME")  # what systemd-socket-activate keeps by itself


class HeldSocket:
    def __init__(self, path: Path, backlog: int = sockets.BACKLOG, fdname: str = PROXY_FDNAME) -> None:
        self.path = path
        self.fdname = fdname
        path.parent.mkdir(mode=sockets.DIR_MODE, parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sockets.restrictive_umask():  # SocketMode=0660, as the unit sets it
            self.sock.bind(str(path))
        self.sock.listen(backlog)

    @property
    def open(self) -> bool:
        return self.sock.fileno() >= 0

    def launch(
        self, argv: Sequence[str], env: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str], tuple[int, ...]]:
        """``(argv, env, pass_fds)`` for Popen: ``argv`` run by systemd-socket-activate with a
        copy of the socket as fd 3 and ``env`` passed on with ``-E``."""
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise SandboxError("systemd-socket-activate not found (Debian's systemd; run scripts/setup.sh)")
        fd = os.dup(self.sock.fileno())  # for the child (pass_fds); the caller closes it after Popen
        script = f'exec 3<&{fd} {fd}<&- && export LISTEN_PID=$$ LISTEN_FDS=1 && exec "$0" "$@"'
        setenv = [f"--setenv={k}={v}" for k, v in env.items() if k not in PASSED_THROUGH]
        wrapped = ["bash", "-c", script, activate, f"--fdname={self.fdname}", *setenv, *argv]
        keep = {k: v for k, v in env.items() if k in PASSED_THROUGH}
        return wrapped, keep, (fd,)

    def wake(self) -> None:
        """A connection attempt, as the kubelet's would be: systemd-socket-activate execs the daemon
        on it (systemd starts the enabled service at boot without one). The daemon accepts it and
        finds it closed."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.path))

    def close(self) -> None:
        """The socket unit stops: systemd closes the socket (RemoveOnStop=no: the file stays)."""
        self.sock.close()
