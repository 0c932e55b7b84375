"""Config targets of ``nodeagent apply``: each module renders, purely, what one component's files hold.

Every target has ``render(config, facts) -> TargetPlan``: it reads nothing and writes nothing; the
inputs are the validated ``Config`` and the ``NodeFacts`` gathered once (which include the current
text of the files a target patches). ``nodeagent.apply.runner`` turns plans into atomic writes.

Files that nodeagent owns wholly (kubelet drop-in, NodeConfig drop-in, hosts.toml files) carry
``OWNED_MARKER`` in a comment on their first line; only files carrying it are ever removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

OWNED_MARKER = "Managed by nodeagent"


def owned_header(what: str) -> str:
    """The first comment line of every file nodeagent owns (``#`` works for TOML and YAML)."""
    return f"# {OWNED_MARKER} ({what}): edit the nodeagent config instead; changes here are overwritten.\n"


def is_owned(text: str | bytes) -> bool:
    """True when a file's content carries nodeagent's ownership marker on its first line."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    first = text.split("\n", 1)[0]
    return first.startswith("#") and OWNED_MARKER in first


class TargetError(Exception):
    """A target cannot render (bad existing file, unsafe name): the message says where and why."""


@dataclass(frozen=True)
class DesiredFile:
    path: Path
    content: str
    mode: int = 0o644
    owned: bool = True  # wholly ours (carries OWNED_MARKER); False: another component's file we patch
    secret: bool = False  # holds header values (tokens): values are redacted in printed diffs


@dataclass
class TargetPlan:
    target: str
    files: list[DesiredFile] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)  # our own files that are no longer wanted
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # decisions worth printing (not problems)
    notes_on_change: list[str] = field(default_factory=list)  # printed only when a file of the plan changes
    restart_on_change: bool = False  # a change to these files takes effect only after a containerd restart
