"""Benchmark result files: each benchmark that has something to draw writes its raw figures to
``bench/results/<name>.json`` (``python -m bench --plot`` draws them; bench/plot.py lists the
fields each chart reads). Written atomically, so a chart never reads half a file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from nodeagent.util.atomicio import write_atomic


def _dir(results_dir: Path | None) -> Path:
    from bench import results_dir as default_dir  # $NODEAGENT_BENCH_RESULTS or bench/results/

    return results_dir or default_dir()


def write(name: str, data: dict[str, Any], results_dir: Path | None = None) -> Path:
    path = _dir(results_dir) / f"{name}.json"
    doc = {
        "benchmark": name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "cpus": _cpus()},
        **data,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=1) + "\n", mode=0o644)
    print(f"results: {path}")
    return path


def read(name: str, results_dir: Path | None = None) -> dict[str, Any] | None:
    path = _dir(results_dir) / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
