"""Validate a config document: check parsed data against ``schema.SCHEMA`` and ``schema.RULES`` and
build ``model.Config``, the last step of loading (read -> merge -> validate, ``nodeagent.config.sources``).

Every problem is collected (not only the first) and raised once as ``ConfigError``; each prints as
``path.to.key: message (line N)``. Header values are never part of a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodeagent.config import model as m
from nodeagent.config.problems import ConfigError, Ctx, Loc, Parts, Problem
from nodeagent.config.schema import RULES, SCHEMA
from nodeagent.config.yamldoc import parse_yaml, read_text

__all__ = ["ConfigError", "Problem", "default_config", "load", "load_data", "load_text", "parse_yaml"]


def load_data(data: Any, source: str = "<data>", ctx: Ctx | None = None) -> m.Config:
    """Check already-parsed data (for example a merge of several documents) and build the Config.

    ``ctx`` carries line numbers when the data came from ``parse_yaml``.
    """
    ctx = ctx if ctx is not None else Ctx(source=source)
    ctx.source = source
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem(source, "the top level must be a mapping of keys (apiVersion, kind, ...)")]
        )
    config = SCHEMA.check(data, Loc(), ctx)
    for rule in RULES:
        if any(p in ctx.bad for p in rule.paths) or config is None:
            continue
        message = rule.check(config)
        if message:
            ctx.add(
                Loc(tuple(rule.paths[0].split(".")), rule.paths[0]), message, line=_rule_line(rule.paths, ctx)
            )
    if ctx.problems:
        problems = sorted(ctx.problems, key=lambda p: (p.line is None, p.line or 0))
        raise ConfigError(problems, source)
    assert isinstance(config, m.Config)
    return config


def _rule_line(paths: Any, ctx: Ctx) -> int | None:
    for p in paths:
        parts: Parts = tuple(p.split("."))
        if parts in ctx.value_lines:
            return ctx.value_lines[parts]
    return None


def load_text(text: str, source: str = "<string>") -> m.Config:
    data, ctx = parse_yaml(text, source)
    return load_data(data, source, ctx)


def load(path: str | Path) -> m.Config:
    """Read, parse and validate the config file at ``path`` (already under ``--root``) alone; commands
    use ``nodeagent.config.sources.load_for_command``, which also merges the user-data part."""
    return load_text(read_text(Path(path)), str(path))


def default_config() -> m.Config:
    """The Config every omitted key falls back to (the model's defaults)."""
    return m.Config()
