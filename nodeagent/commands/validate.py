"""``nodeagent validate [-c FILE] [--imds auto|on|off]``: load and validate the config, print every problem.

Exit 0 when valid (one OK line, then every setting that differs from its default, WALinuxAgent
style, then the same warnings ``apply`` gives about valid settings with a price), 2 when invalid
(every problem on stderr as ``path.to.key: message (line N)``, the report every command uses).

The config is loaded as every other command loads it (``nodeagent.commands.loadconfig``): the file,
and the user-data part from IMDSv2 merged over it when IMDS is on (``--imds``, else
``$NODEAGENT_IMDS``, else auto: on where nodeadm is installed). A bad part is a problem here (exit 2;
the other commands fall back to the file), an unreachable IMDS a warning.

Import-light: this runs on the boot path, so nothing on it imports grpc, prometheus_client or
tomlkit (``bench/bench_validate.py`` checks), and the IMDS code is imported only when IMDS is on.
"""

from __future__ import annotations

import argparse
import sys

from nodeagent.cli import EXIT_INVALID_CONFIG, EXIT_OK
from nodeagent.commands.loadconfig import load, report_invalid
from nodeagent.config.schema import differences
from nodeagent.config.warnings import config_warnings
from nodeagent.util.paths import Paths


def run(args: argparse.Namespace) -> int:
    paths = Paths.at(args.root)
    loaded = load(args, paths)
    if loaded is None:
        return EXIT_INVALID_CONFIG
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if loaded.userdata_error:
        # the fallback note ("user-data ignored: using the baked config ...") is for the other
        # commands, which go on with the file; validate reports the part as invalid
        lines = [x for x in loaded.userdata_error.splitlines() if not x.startswith("user-data ignored:")]
        path = paths.config_for(args.config)
        report_invalid(f"{path} + imds:user-data", lines)
        return EXIT_INVALID_CONFIG
    config = loaded.config
    what = " + ".join(loaded.sources)
    diffs = differences(config)
    if not diffs:
        print(f"{what}: OK, all defaults")
    elif len(diffs) == 1:
        print(f"{what}: OK, 1 setting differs from its default:")
    else:
        print(f"{what}: OK, {len(diffs)} settings differ from defaults:")
    for key, value, default in diffs:
        print(f"  {key}: {value} (default: {default})")
    for warning in config_warnings(config):  # valid settings that have a price, as apply says
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK
