import pytest

from nodeagent.targets import OWNED_MARKER, go_duration, is_owned, owned_header


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (1, "1s"),
        (90, "1m30s"),
        (120, "2m0s"),
        (3600, "1h0m0s"),
        (1.5, "1.5s"),
        (86400 + 61, "24h1m1s"),
        (0.000001, "1us"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_go_duration_refuses_negative() -> None:
    with pytest.raises(ValueError):
        go_duration(-1)


def test_ownership_marker_only_on_first_line() -> None:
    assert is_owned(owned_header("x") + "a = 1\n")
    assert is_owned((owned_header("x") + "a").encode())
    assert not is_owned("a = 1\n# " + OWNED_MARKER + "\n")
    assert not is_owned("")
