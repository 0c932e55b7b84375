"""Read a config document: the file's text (bounded, UTF-8) and its YAML as plain data with the line of
every key and value (``Ctx``), so that every later problem can name its line. The first step of
loading (read -> merge -> validate: ``nodeagent.config.sources``); knows nothing of the schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodeagent.config.model import API_VERSION, KIND
from nodeagent.config.problems import ConfigError, Ctx, Loc, Problem

_STR_TAG = "tag:yaml.org,2002:str"
# Bounds: a config is small; these stop a hostile or broken file from using unbounded memory/time
# (aliases can expand a short file exponentially, deep nesting exhausts the stack).
MAX_BYTES = 1 << 20
MAX_NODES = 50_000
MAX_DEPTH = 32


class _TooBig(Exception):
    pass


def parse_yaml(text: str, source: str = "<string>") -> tuple[Any, Ctx]:
    """The document as plain Python data, plus a ``Ctx`` holding the line of every key and value.

    Raises ``ConfigError`` for YAML syntax errors, duplicate keys, non-string keys, an empty document
    or a top level that is not a mapping.
    """
    import yaml

    ctx = Ctx(source=source)
    if len(text) > MAX_BYTES:
        raise ConfigError([Problem(source, f"the file is larger than {MAX_BYTES >> 10} KiB")])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError([Problem(source, "invalid YAML: nested too deeply")]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or "syntax error"
        if e.context and e.problem and e.problem.startswith("but "):
            what = f"{e.context}, {e.problem}"
        raise ConfigError(
            [Problem(source, f"invalid YAML: {what}", mark.line + 1 if mark else None)]
        ) from None
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML parse error is a MarkedYAMLError
        raise ConfigError([Problem(source, f"invalid YAML: {type(e).__name__}")]) from None
    if node is None:
        raise ConfigError(
            [
                Problem(
                    source,
                    f"the file is empty; a config starts with 'apiVersion: {API_VERSION}' and "
                    f"'kind: {KIND}' (a commented example: docs/config.example.yaml)",
                )
            ]
        )
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        raise ConfigError(
            [
                Problem(
                    source,
                    f"the top level must be a mapping of keys (apiVersion, kind, ...), got {kind}",
                    node.start_mark.line + 1,
                )
            ]
        )
    constructor = yaml.SafeLoader("")
    try:
        data = _to_data(node, Loc(), ctx, constructor, yaml, [0])
    except _TooBig as e:
        raise ConfigError([Problem(source, str(e))]) from None
    if ctx.problems:
        raise ConfigError(ctx.problems, source)
    return data, ctx


def _to_data(node: Any, loc: Loc, ctx: Ctx, constructor: Any, yaml: Any, count: list[int]) -> Any:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise _TooBig(f"more than {MAX_NODES} YAML values (aliases expanding too far?)")
    if len(loc.parts) > MAX_DEPTH:
        raise _TooBig(f"nested more than {MAX_DEPTH} levels deep (line {node.start_mark.line + 1})")
    ctx.value_lines[loc.parts] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                what = "merge keys (<<)" if key_node.tag == "tag:yaml.org,2002:merge" else "non-string keys"
                ctx.add(loc.field(str(key_node.value)), f"{what} are not supported", line=line)
                continue
            key = key_node.value
            child = loc.field(key)
            if key in first:
                ctx.add(child, f"duplicate key (first at line {first[key]})", line=line)
                continue
            first[key] = line
            ctx.key_lines[child.parts] = line
            out[key] = _to_data(value_node, child, ctx, constructor, yaml, count)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(v, loc.item(i), ctx, constructor, yaml, count) for i, v in enumerate(node.value)]
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.YAMLError:
        ctx.add(loc, f"unsupported YAML value or tag {node.tag!r}")
        return None


def read_text(path: Path) -> str:
    """The config file's text (at most ``MAX_BYTES``), or ``ConfigError`` naming the file."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError([Problem(str(path), f"cannot read: {e.strerror}")], str(path)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(str(path), f"not UTF-8 text (byte {e.start})")], str(path)) from None
