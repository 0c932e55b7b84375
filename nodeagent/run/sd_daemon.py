"""systemd's service protocols (sd-daemon(3)), spoken directly, without libsystemd.

- ``sd_notify(state)``: ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1`` ... over ``$NOTIFY_SOCKET``;
  ``watchdog_interval()`` from ``$WATCHDOG_USEC``/``$WATCHDOG_PID``; ``watchdog()`` the daemon's
  ping loop (WATCHDOG=1 while its event loop runs).
- ``listen_fds()``: the sockets socket activation passed (``systemd/nodeagent.socket``, or
  ``systemd-socket-activate``): ``$LISTEN_PID`` must be this process, ``$LISTEN_FDS`` sockets
  start at fd 3, ``$LISTEN_FDNAMES`` names them (``FileDescriptorName=``, colon-separated). The
  three variables are removed either way (as ``sd_listen_fds(1)`` does), so child processes never
  see them; the fds are marked close-on-exec.
- ``take_unix_listener(fds, name)``: the one the CRI proxy serves on, checked to be a listening
  ``AF_UNIX`` ``SOCK_STREAM`` socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.util.log import event, get_logger

log = get_logger(__name__)

SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 64  # nodeagent.socket passes one; anything near this is not our unit
PROXY_FDNAME = "cri-proxy"  # FileDescriptorName= of systemd/nodeagent.socket


class ListenFdsError(ValueError):
    """The passed sockets cannot be used (the message names the variable or fd and what is wrong)."""


# --- sd_notify ----------------------------------------------------------------------------------
def sd_notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's NOTIFY_SOCKET; False when not under systemd."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            # Never block the event loop: if the receiver's queue is full, drop this message.
            s.setblocking(False)
            s.connect(addr)
            s.send(state.encode())
    except OSError as e:
        if not state.startswith("WATCHDOG"):  # pings are frequent; a dropped one is not news
            event(log, "sd_notify failed", level=30, state=state.split("=")[0], error=str(e))
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not requested."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


async def watchdog(environ: Mapping[str, str] | None = None) -> None:
    """Send WATCHDOG=1 every ``watchdog_interval()`` for as long as the event loop runs (until
    cancelled); returns at once when the unit set no ``WatchdogSec``."""
    interval = watchdog_interval(environ)
    if not interval:
        return
    while True:
        sd_notify("WATCHDOG=1", environ)
        await asyncio.sleep(interval)


# --- socket activation --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ListenFd:
    fd: int
    name: str  # "" when the passer named none


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[ListenFd]:
    """The file descriptors socket activation passed to this process ([] when none were, or when
    ``LISTEN_PID`` names another process: the variables were inherited, not meant for us)."""
    env = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    names = env.pop("LISTEN_FDNAMES", None)
    if count is None or pid is None or pid.strip() != str(os.getpid()):
        return []
    if not count.strip().isdigit():
        raise ListenFdsError(f"LISTEN_FDS={count!r}: not a number of file descriptors")
    n = int(count)
    if n > MAX_LISTEN_FDS:
        raise ListenFdsError(f"LISTEN_FDS={n}: more than {MAX_LISTEN_FDS} file descriptors")
    labels = names.split(":") if names else []
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds() sets it
        except OSError as e:
            raise ListenFdsError(f"LISTEN_FDS={n}: fd {fd} is not open ({e.strerror})") from None
        out.append(ListenFd(fd, labels[i] if i < len(labels) else ""))
    return out


def take_unix_listener(fds: Sequence[ListenFd], name: str = PROXY_FDNAME) -> socket.socket | None:
    """The socket named ``name`` (or the only one passed, whatever its name), checked to be a
    listening unix stream socket; None when nothing was passed."""
    if not fds:
        return None
    chosen = next((f for f in fds if f.name == name), None)
    if chosen is None:
        if len(fds) > 1:
            got = ", ".join(f"fd {f.fd} {f.name or '(unnamed)'}" for f in fds)
            raise ListenFdsError(
                f"LISTEN_FDNAMES: none of the {len(fds)} sockets passed ({got}) is named {name!r}"
            )
        chosen = fds[0]
    what = f"LISTEN_FDS: fd {chosen.fd}" + (f" ({chosen.name})" if chosen.name else "")
    try:
        sock = socket.socket(fileno=chosen.fd)
    except OSError as e:
        raise ListenFdsError(f"{what} is not a socket ({e.strerror})") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        sock.detach()
        raise ListenFdsError(f"{what}: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        kind = f"{sock.family.name} {sock.type.name}{'' if listening else ', not listening'}"
        sock.detach()  # not ours to close: whoever passed it decides
        raise ListenFdsError(f"{what} is {kind}; the proxy needs a listening AF_UNIX SOCK_STREAM socket")
    return sock


def socket_path(sock: socket.socket) -> str:
    """The filesystem path a unix socket is bound to ("" when unnamed, "@name" when abstract)."""
    name = sock.getsockname()
    if isinstance(name, bytes):  # abstract namespace
        return "@" + name[1:].decode(errors="replace")
    return str(name)


def same_socket_path(a: str | Path, b: str | Path) -> bool:
    """Do two socket paths name the same file? (``/var/run`` vs ``/run``: the directories are
    compared resolved, the socket file itself is not a symlink.)"""
    pa, pb = Path(a), Path(b)
    if not str(a) or not str(b) or str(a).startswith("@") or str(b).startswith("@"):
        return str(a) == str(b)
    return pa.name == pb.name and pa.parent.resolve() == pb.parent.resolve()
