"""``nodeagent validate [-c FILE]``: load and validate the config, print every problem.

Exit 0 when valid (one OK line, then every setting that differs from its default), 2 when invalid
(every problem on stderr as ``path.to.key: message (line N)``). Import-light: this runs on the boot
path, so nothing here (or in nodeagent.config) imports grpc, prometheus_client or tomlkit.
"""

from __future__ import annotations

import argparse
import sys

from nodeagent.cli import DEFAULT_CONFIG, EXIT_INVALID_CONFIG, EXIT_OK
from nodeagent.config import ConfigError, load
from nodeagent.config.schema import differences
from nodeagent.paths import Paths


def config_path(args: argparse.Namespace) -> str:
    """The config file for ``-c``/``--root``: ``-c`` as given, else the default under ``--root``."""
    if args.config:
        return str(args.config)
    return str(Paths.at(args.root).host(DEFAULT_CONFIG))


def run(args: argparse.Namespace) -> int:
    path = config_path(args)
    try:
        config = load(path)
    except ConfigError as e:
        n = len(e.problems)
        print(f"{path}: invalid, {n} problem{'' if n == 1 else 's'}:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    diffs = differences(config)
    print(f"{path}: OK" + (f", {len(diffs)} settings differ from defaults:" if diffs else ", all defaults"))
    for key, value, default in diffs:
        print(f"  {key}: {value} (default: {default})")
    return EXIT_OK
