"""YAML (or JSON) text that must hold a mapping, read one way: errors name the source and the line."""

from __future__ import annotations

from typing import Any


def load_mapping(
    text: str, source: str, error: type[Exception], *, invalid: str, not_mapping: str
) -> dict[str, Any]:
    """``yaml.safe_load(text)``; ``error(f"{source}: {invalid} (line N)")`` when it does not parse,
    ``error(f"{source}: {not_mapping}")`` when its top level is not a mapping."""
    import yaml  # not on every command's path

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise error(f"{source}: {invalid}{line}") from None
    if not isinstance(doc, dict):
        raise error(f"{source}: {not_mapping}")
    return doc
