"""Proxy socket preparation: stale sockets replaced, live sockets and non-sockets refused."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from nodeagent.proxy.sockets import SocketInUseError, prepare_socket_path, remove_socket
from tests.unit.proxy.helpers import rm, short_tmp


def test_parent_directory_is_created() -> None:
    d = short_tmp()
    p = Path(d) / "a" / "b" / "cri.sock"
    prepare_socket_path(p)
    assert p.parent.is_dir()
    rm(d)


def test_stale_socket_is_replaced() -> None:
    d = short_tmp()
    p = Path(d) / "cri.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(p))
    s.close()  # bound, never listening: what a crashed process leaves
    prepare_socket_path(p)
    assert not p.exists()
    rm(d)


def test_live_socket_is_refused_and_kept() -> None:
    d = short_tmp()
    p = Path(d) / "cri.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(p))
        s.listen(1)
        with pytest.raises(SocketInUseError, match="another process"):
            prepare_socket_path(p)
        assert p.exists()
    rm(d)


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_non_socket_is_never_removed(kind: str) -> None:
    d = short_tmp()
    p = Path(d) / "cri.sock"
    if kind == "file":
        p.write_text("precious")
    elif kind == "dir":
        p.mkdir()
    else:
        (Path(d) / "target").write_text("precious")
        os.symlink(Path(d) / "target", p)
    with pytest.raises(SocketInUseError, match="not a socket"):
        prepare_socket_path(p)
    assert os.path.lexists(p)
    remove_socket(p)  # shutdown never deletes a non-socket either
    assert os.path.lexists(p)
    rm(d)
