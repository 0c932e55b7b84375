"""Endpoints parsed one way: host:port splitting, listen addresses, URL and unix-socket spelling."""

from __future__ import annotations

import pytest

from nodeagent.util import endpoints as ep


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("docker.io", ("docker.io", None)),
        ("localhost:5000", ("localhost", "5000")),
        ("[fd00::1]:5000", ("[fd00::1]", "5000")),
        ("[fd00::1]", ("[fd00::1]", None)),
        (":9847", ("", "9847")),
        ("a:b:c", None),
        ("[fd00::1]x", None),
        ("[fd00::1", None),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, str | None] | None) -> None:
    assert ep.split_host_port(text) == expected


@pytest.mark.parametrize(
    ("listen", "expected"),
    [(":9847", ("0.0.0.0", 9847)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::]:9847", ("::", 9847))],
)
def test_listen_address(listen: str, expected: tuple[str, int]) -> None:
    assert ep.listen_address(listen) == expected


@pytest.mark.parametrize("bad", ["9847", "host:", "host:http", "a:b:1"])
def test_listen_address_refuses_what_is_not_host_port(bad: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        ep.listen_address(bad)


def test_url_and_socket_spelling() -> None:
    assert ep.strip_scheme(" https://m.example.com/v2/x ") == "m.example.com/v2/x"
    assert ep.without_trailing_slash("https://m.example.com//") == "https://m.example.com"
    assert ep.unix_socket_path("unix:///run/x.sock") == ep.unix_socket_path("/run/x.sock") == "/run/x.sock"
    assert ep.unix_endpoint("/run/x.sock") == ep.unix_endpoint("unix:///run/x.sock") == "unix:///run/x.sock"
