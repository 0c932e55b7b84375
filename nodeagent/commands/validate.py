"""``nodeagent validate [-c FILE] [--imds on]``: load and validate the config, print every problem.

Exit 0 when valid (one OK line, then every setting that differs from its default, WALinuxAgent
style), 2 when invalid (every problem on stderr as ``path.to.key: message (line N)``).

By default only the file is checked. With an explicit ``--imds on`` (or ``auto``) the user-data part
from IMDSv2 is merged over it as the other commands do (``nodeagent.config.sources``) and the result
is checked: a bad part is a problem (exit 2), an unreachable IMDS a warning.

Import-light: this runs on the boot path, so nothing on it imports grpc, prometheus_client or
tomlkit (``bench/bench_validate.py`` checks), and the IMDS code is imported only with ``--imds``.
"""

from __future__ import annotations

import argparse
import sys

from nodeagent.cli import EXIT_INVALID_CONFIG, EXIT_OK
from nodeagent.config import Config, ConfigError, load
from nodeagent.config.schema import differences
from nodeagent.paths import Paths


def _invalid(path: str, problems: list[str]) -> int:
    n = len(problems)
    print(f"{path}: invalid, {n} problem{'' if n == 1 else 's'}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_INVALID_CONFIG


def _with_user_data(args: argparse.Namespace, path: str) -> tuple[Config, str] | int:
    from nodeagent.config.sources import load_for_command

    loaded = load_for_command(args, Paths.at(args.root))
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if loaded.userdata_error:
        # the fallback note ("user-data ignored: using the baked config ...") is for the other
        # commands, which go on with the file; validate reports the part as invalid
        lines = [x for x in loaded.userdata_error.splitlines() if not x.startswith("user-data ignored:")]
        return _invalid(f"{path} + imds:user-data", lines)
    return loaded.config, " + ".join(loaded.sources)


def run(args: argparse.Namespace) -> int:
    path = str(Paths.at(args.root).config_for(args.config))
    try:
        if getattr(args, "imds", None) in ("on", "auto"):
            result = _with_user_data(args, path)
            if isinstance(result, int):
                return result
            config, what = result
        else:
            config, what = load(path), path
    except ConfigError as e:
        return _invalid(path, [str(p) for p in e.problems])
    diffs = differences(config)
    print(f"{what}: OK" + (f", {len(diffs)} settings differ from defaults:" if diffs else ", all defaults"))
    for key, value, default in diffs:
        print(f"  {key}: {value} (default: {default})")
    from nodeagent.targets.mirrors import config_warnings  # valid settings that have a price

    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK
