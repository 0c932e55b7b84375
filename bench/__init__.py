"""Benchmarks: ``python -m bench`` runs every ``bench/bench_*.py``; each prints its own figures.

A benchmark script is a module with ``main(argv) -> int`` (0 = target met). It measures against a
baseline taken in the same run (ratios, not absolute times alone), because the machine is shared.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_times(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) for every module ``python argv[1:]`` imports
    (``-X importtime``; ``argv[0]`` is the interpreter)."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", *argv[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        check=False,
    ).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cumulative, name = line[len("import time:") :].split("|")
        rows.append((int(cumulative), name.strip()))
    return rows
