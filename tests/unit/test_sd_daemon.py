"""The socket-activation side of sd_daemon (sd_notify is tested in test_daemon.py): which passed
fds are taken, what is refused and with what message, and that the variables never reach children.

Passed sockets sit at fd 3 and up, as systemd puts them; ``at_fds`` moves the test's sockets there
for the duration of a test and puts back what was there (pytest keeps /dev/null on fd 3).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from nodeagent.run.sd_daemon import (
    ListenFd,
    ListenFdsError,
    listen_fds,
    same_socket_path,
    socket_path,
    take_unix_listener,
)
from tests.unit.proxy.helpers import rm, short_tmp


@contextlib.contextmanager
def at_fds(socks: Sequence[socket.socket | None]) -> Iterator[None]:
    """Dup ``socks`` onto fds 3, 4, ... (inheritable, as exec leaves them; None: that fd closed);
    put back what was there afterwards."""
    saved: list[tuple[int, int | None]] = []
    try:
        for i, s in enumerate(socks):
            fd = 3 + i
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:
                saved.append((fd, None))
            if s is None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            else:
                os.dup2(s.fileno(), fd, inheritable=True)
        yield
    finally:
        for fd, old in saved:
            if old is None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            else:
                os.dup2(old, fd, inheritable=os.get_inheritable(old))
                os.close(old)


def env(n: int = 1, names: str | None = None, pid: int | None = None) -> dict[str, str]:
    e = {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": str(n), "OTHER": "kept"}
    if names is not None:
        e["LISTEN_FDNAMES"] = names
    return e


def unix_listener(d: str, name: str = "cri.sock") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(d, name))
    s.listen(8)
    return s


def test_passed_socket_is_taken_and_the_variables_are_consumed() -> None:
    d = short_tmp()
    held = unix_listener(d)
    try:
        with at_fds([held]):
            e = env(names="cri-proxy")
            fds = listen_fds(e)
            assert fds == [ListenFd(3, "cri-proxy")]
            assert e == {"OTHER": "kept"}  # children never see LISTEN_*
            assert not os.get_inheritable(3)  # close-on-exec, as sd_listen_fds() leaves it
            sock = take_unix_listener(fds)
            assert sock is not None and sock.fileno() == 3
            assert socket_path(sock) == os.path.join(d, "cri.sock")
            # It is the socket the test holds: a connection to the path is accepted on it.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(os.path.join(d, "cri.sock"))
                conn, _ = sock.accept()
                conn.close()
            sock.detach()
    finally:
        held.close()
        rm(d)


def test_variables_for_another_process_are_ignored_and_removed() -> None:
    e = env(pid=os.getpid() + 100_000)
    assert listen_fds(e) == []
    assert e == {"OTHER": "kept"}
    no_pid = {"LISTEN_FDS": "1"}
    assert listen_fds(no_pid) == [] and no_pid == {}  # sd_listen_fds: no LISTEN_PID, no fds
    assert listen_fds({}) == []
    assert take_unix_listener([]) is None


def test_os_environ_is_cleaned_for_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "cri-proxy")
    assert listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


@pytest.mark.parametrize(
    ("count", "message"),
    [
        ("one", "LISTEN_FDS='one': not a number of file descriptors"),
        ("-1", "LISTEN_FDS='-1': not a number"),
        ("65", "LISTEN_FDS=65: more than 64"),
    ],
)
def test_malformed_count_is_an_error(count: str, message: str) -> None:
    e = env()
    e["LISTEN_FDS"] = count
    with pytest.raises(ListenFdsError, match=message.replace("(", r"\(")):
        listen_fds(e)
    assert "LISTEN_FDS" not in e


def test_a_closed_fd_is_an_error() -> None:
    with at_fds([None]), pytest.raises(ListenFdsError, match="LISTEN_FDS=1: fd 3 is not open"):
        listen_fds(env(1))


def test_the_named_socket_is_chosen_among_several() -> None:
    d = short_tmp()
    a, b = unix_listener(d, "a.sock"), unix_listener(d, "b.sock")
    try:
        with at_fds([a, b]):
            fds = listen_fds(env(2, "metrics:cri-proxy"))
            assert [f.name for f in fds] == ["metrics", "cri-proxy"]
            sock = take_unix_listener(fds)
            assert sock is not None and socket_path(sock).endswith("b.sock")
            sock.detach()
            with pytest.raises(ListenFdsError, match=r"none of the 2 sockets passed .* is named 'cri-proxy'"):
                take_unix_listener([ListenFd(3, "x"), ListenFd(4, "")])
            # One socket, whatever its name (systemd's default is the unit's name): it is ours.
            only = take_unix_listener([ListenFd(3, "nodeagent.socket")])
            assert only is not None and socket_path(only).endswith("a.sock")
            only.detach()
    finally:
        a.close()
        b.close()
        rm(d)


def test_wrong_kinds_of_socket_are_refused_and_left_open() -> None:
    d = short_tmp()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(os.path.join(d, "dgram.sock"))
    unlistened = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unlistened.bind(os.path.join(d, "idle.sock"))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    try:
        for s, what in (
            (dgram, "AF_UNIX SOCK_DGRAM, not listening"),
            (unlistened, "AF_UNIX SOCK_STREAM, not listening"),
            (tcp, "AF_INET SOCK_STREAM"),
        ):
            expected = f"fd {s.fileno()} .*is {what}; the proxy needs a listening"
            with pytest.raises(ListenFdsError, match=expected):
                take_unix_listener([ListenFd(s.fileno(), "cri-proxy")])
            os.fstat(s.fileno())  # still open: not ours to close
        with open(os.path.join(d, "file"), "w") as f, pytest.raises(ListenFdsError, match="is not a socket"):
            take_unix_listener([ListenFd(f.fileno(), "")])
    finally:
        for s in (dgram, unlistened, tcp):
            s.close()
        rm(d)


def test_same_socket_path(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var/run").symlink_to(tmp_path / "run")
    assert same_socket_path(tmp_path / "run/cri.sock", tmp_path / "var/run/cri.sock")
    assert same_socket_path(str(tmp_path / "run/./cri.sock"), tmp_path / "run/cri.sock")
    assert not same_socket_path(tmp_path / "run/cri.sock", tmp_path / "run/other.sock")
    assert not same_socket_path("@abstract", tmp_path / "run/cri.sock")
    assert not same_socket_path("", tmp_path / "run/cri.sock")


def test_watchdog_returns_at_once_without_watchdogsec() -> None:
    import asyncio

    from nodeagent.run.sd_daemon import watchdog

    asyncio.run(asyncio.wait_for(watchdog({}), 1))  # no WATCHDOG_USEC: nothing to ping
