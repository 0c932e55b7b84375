"""Benchmark result files: each benchmark that has something to draw writes its raw figures to
``bench/results/<name>.json`` (``python -m bench --plot`` draws them; bench/plot.py lists the
fields each chart reads). Written atomically, so a chart never reads half a file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from nodeagent.atomicio import write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write(name: str, data: dict[str, Any], results_dir: Path | None = None) -> Path:
    path = (results_dir or RESULTS_DIR) / f"{name}.json"
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
    path = (results_dir or RESULTS_DIR) / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
