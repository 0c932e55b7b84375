"""Shared builders for apply/target unit tests: configs from YAML text, facts for made-up nodes."""

from __future__ import annotations

import textwrap
from pathlib import Path

from nodeagent.apply.facts import NodeFacts
from nodeagent.config import load_text
from nodeagent.config.model import Config
from nodeagent.util.paths import Paths

DATA = Path(__file__).resolve().parents[2] / "data"
HEADER = "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"


def config(body: str = "") -> Config:
    return load_text(HEADER + textwrap.dedent(body), "<test>")


def facts(root: Path, containerd_config: str | None = None, **kw: object) -> NodeFacts:
    base: dict[str, object] = dict(
        paths=Paths(root),
        cpus=8,
        memory_bytes=32 * 2**30,
        nic_speed_mbps=10_000,
        imagefs_bytes=100 * 2**30,
        containerd_config=containerd_config,
        nodeadm_present=False,
    )
    base.update(kw)
    return NodeFacts(**base)  # type: ignore[arg-type]
