"""Go durations: the one parser and the one formatter (shortest form for people, Go's own for files)."""

from __future__ import annotations

import re

import pytest

from nodeagent.util import durations as d
from nodeagent.util.durations import format_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("2h45m30.5s", 9930.5),
        ("100us", 0.0001),
        ("100\u00b5s", 0.0001),
        ("-5m", -300.0),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert d.parse_duration(text) == pytest.approx(seconds)
    assert re.fullmatch(d.DURATION_PATTERN, text) or text.startswith("-")


@pytest.mark.parametrize("text", ["", "5", "10 m", "10min", "m", "1d", "1h 30m", "s10", "--1s", "1e3s"])
def test_bad_durations_are_refused_by_parser_and_pattern(text: str) -> None:
    assert d.parse_duration(text) is None
    assert not re.search(d.DURATION_PATTERN, text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.5, "500ms"), (120, "2m"), (5400, "1h30m"), (90.5, "1m30.5s"), (7200, "2h")],
)
def test_durations_format_back_go_style(seconds: float, text: str) -> None:
    assert d.format_duration(seconds) == text
    assert d.parse_duration(text) == seconds


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
def test_format_duration(seconds: float, text: str, go=True) -> None:
    assert format_duration(seconds, go=True) == text


def test_go_style_refuses_negative() -> None:
    with pytest.raises(ValueError):
        format_duration(-1, go=True)


@pytest.mark.parametrize(
    ("seconds", "short", "go"), [(120, "2m", "2m0s"), (3600, "1h", "1h0m0s"), (61, "1m1s", "1m1s")]
)
def test_one_formatter_two_spellings_of_zero_units(seconds: float, short: str, go: str) -> None:
    assert (format_duration(seconds), format_duration(seconds, go=True)) == (short, go)
    assert d.parse_duration(short) == d.parse_duration(go) == seconds
