"""Benchmarks: ``python -m bench`` runs every ``bench/bench_*.py``; each prints its own figures.

A benchmark script is a module with ``main(argv) -> int`` (0 = target met). It measures against a
baseline taken in the same run (ratios, not absolute times alone), because the machine is shared.

Results files: a benchmark that keeps its figures for later (plots, comparisons across runs) writes
them with ``bench.results.write(name, data)`` as ``<results dir>/<name>.json``; the results dir is
``$NODEAGENT_BENCH_RESULTS`` or ``bench/results/``. Each file is one JSON object with at least
``benchmark`` (the name) and ``finished_at`` (UTC); the rest is described in the benchmark's
docstring, and bench/plot.py lists the fields each chart reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_ENV = "NODEAGENT_BENCH_RESULTS"


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or REPO / "bench" / "results")


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
