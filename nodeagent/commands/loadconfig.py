"""How a command gets its config, and how it says the config is invalid: one way for every command.

``load(args, paths)`` is ``nodeagent.config.sources.load_for_command`` (baked file, then the
user-data part from IMDS, merged and validated once) with the one report of an invalid config, the
same for ``validate``, ``apply``, ``prefetch``, ``run``, ``evict`` and ``userdata``::

    /etc/nodeagent/config.yaml: invalid, 2 problems:
      kubelet.registryPullQps: unknown key (did you mean 'registryPullQPS'?) (line 4)
      ...

then exit 2 (``EXIT_INVALID_CONFIG``). ``print_notes`` prints what loading had to say about the
user-data (IMDS unreachable, a bad part ignored) for commands without a report of their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from nodeagent.config.problems import ConfigError, Problem
from nodeagent.config.sources import LoadedConfig, load_for_command
from nodeagent.util.paths import Paths

EXAMPLE = "docs/config.example.yaml"


def report_invalid(source: str, problems: Sequence[Problem | str], stream: TextIO | None = None) -> None:
    """``SOURCE: invalid, N problem(s):`` then every problem indented, in file order."""
    out = stream or sys.stderr
    n = len(problems)
    print(f"{source}: invalid, {n} problem{'' if n == 1 else 's'}:", file=out)
    for problem in problems:
        print(f"  {problem}", file=out)


def load(
    args: argparse.Namespace,
    paths: Paths,
    *,
    use_imds: bool = True,
    notes: bool = False,
    stream: TextIO | None = None,
) -> LoadedConfig | None:
    """The command's config, or None after reporting why it is invalid (the caller exits 2).
    ``notes``: also print what loading said about the user-data (``print_notes``)."""
    path = paths.config_for(getattr(args, "config", None))
    try:
        loaded = load_for_command(args, paths, use_imds=use_imds)
    except ConfigError as e:
        report_invalid(e.source or str(path), e.problems, stream)
        if not path.exists():
            print(
                f"  no config at {path}: start from {EXAMPLE} (every key, commented) or pass -c FILE",
                file=stream or sys.stderr,
            )
        return None
    if notes:
        print_notes(loaded, stream)
    return loaded


def print_notes(loaded: LoadedConfig, stream: TextIO | None = None) -> None:
    """IMDS warnings and a bad-user-data error (the baked config is used alone)."""
    out = stream or sys.stderr
    for w in loaded.warnings:
        print(f"warning: {w}", file=out)
    if loaded.userdata_error:
        print(f"error: {loaded.userdata_error}", file=out)
