"""``nodeagent status [--json] [--root DIR]``: node health from the daemon's status file and the
last apply report. Exit 0 healthy, 1 degraded. Reads files only (no grpc, no prometheus import)."""

from __future__ import annotations

import argparse
import json
import sys

from nodeagent.cli import EXIT_FAILED, EXIT_OK
from nodeagent.run.status import collect, render
from nodeagent.util.paths import Paths


def run(args: argparse.Namespace) -> int:
    report = collect(Paths.at(args.root))
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report))
    return EXIT_FAILED if report.degraded else EXIT_OK
