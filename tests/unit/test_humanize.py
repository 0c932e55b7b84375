from __future__ import annotations

import pytest

from nodeagent.util import humanize


@pytest.mark.parametrize(
    ("seconds", "want"),
    [(None, "never"), (5, "5s ago"), (125, "2m ago"), (3 * 3600 + 60, "3h01m ago"), (90000, "1d01h ago")],
)
def test_ago(seconds: float | None, want: str) -> None:
    assert humanize.ago(seconds) == want


@pytest.mark.parametrize(
    ("n", "binary", "want"),
    [
        (0, False, "0 B"),
        (999, False, "999 B"),
        (2_500_000, False, "2.5 MB"),
        (120_000_000, False, "120.0 MB"),
        (3 * 10**15, False, "3000.0 TB"),
        (3 << 20, True, "3.0 MiB"),
        (5 << 30, True, "5.0 GiB"),
        (1023, True, "1023 B"),
        (2 << 40, True, "2.0 TiB"),
    ],
)
def test_size(n: int, binary: bool, want: str) -> None:
    assert humanize.size(n, binary=binary) == want


def test_table_aligns_columns_and_trims_trailing_space() -> None:
    assert humanize.table(("A", "LONGER"), [("xyz", ""), ("1", "2")]) == ["A    LONGER", "xyz", "1    2"]
