"""The building blocks of the config schema (``nodeagent.config.schema``).

Each type checks a value parsed from YAML, collects problems (never stops at the first) and returns the
typed value for ``nodeagent.config.model``; the same object renders its JSON Schema and its one-line
description for docs. On a problem the type returns None and the enclosing object keeps the model's
default in its place, so that the rest of the config is still checked; the loader raises at the end
when anything was wrong. Objects (fixed keys, built into the model) are in ``nodeagent.config.objects``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.config.formats import Format
from nodeagent.config.problems import Ctx, Loc
from nodeagent.util.durations import DURATION_PATTERN, format_duration, parse_duration

JSON = dict[str, Any]


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def shown(value: object) -> str:
    """A short rendering of a (non-secret) scalar for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return repr(text)
    if isinstance(value, int | float):
        return repr(value)
    return ""


def got(value: object, *, secret: bool = False) -> str:
    s = "" if secret else shown(value)
    return f"got {kind_of(value)}" + (f" {s}" if s else "")


class Type:
    """Base of all schema types."""

    secret = False

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        raise NotImplementedError

    def json_schema(self) -> JSON:
        raise NotImplementedError

    def doc(self) -> str:
        """Short human text of the type for docs/configuration.md."""
        raise NotImplementedError

    def show(self, value: Any) -> str:
        """Render a checked value for ``nodeagent validate``'s 'differs from default' lines."""
        return str(value)

    def to_yaml(self, value: Any) -> Any:
        """A checked value back in the form a user writes it (defaults in the JSON Schema and docs)."""
        return value


class Bool(Type):
    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        if not isinstance(value, bool):
            ctx.add(loc, f"expected true or false, {got(value)}")
            return None
        return value

    def json_schema(self) -> JSON:
        return {"type": "boolean"}

    def doc(self) -> str:
        return "boolean"

    def show(self, value: Any) -> str:
        return "true" if value else "false"


AUTO = "auto"


@dataclass
class Int(Type):
    minimum: int | None = None
    maximum: int | None = None
    auto: bool = False  # accept the string "auto"

    def _range_text(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"between {self.minimum} and {self.maximum}"
        if self.minimum is not None:
            return f"at least {self.minimum}"
        return f"at most {self.maximum}"

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        if self.auto and value == AUTO:
            return AUTO
        if not isinstance(value, int) or isinstance(value, bool):
            want = "an integer" + (" or 'auto'" if self.auto else "")
            ctx.add(loc, f"expected {want}, {got(value)}")
            return None
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            ctx.add(loc, f"must be {self._range_text()}, got {value}")
            return None
        return value

    def json_schema(self) -> JSON:
        s: JSON = {"type": "integer"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        if self.auto:
            return {"anyOf": [s, {"const": AUTO}]}
        return s

    def doc(self) -> str:
        rng = f" {self.minimum}..{self.maximum if self.maximum is not None else ''}"
        if self.minimum is None and self.maximum is None:
            rng = ""
        return "integer" + rng + (" or `auto`" if self.auto else "")


@dataclass
class Duration(Type):
    """A Go duration string (``500ms``, ``10m``, ``1h30m``), checked value in float seconds."""

    minimum: float = 0.0
    maximum: float | None = None

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        seconds = parse_duration(value) if isinstance(value, str) else None
        if seconds is None or not math.isfinite(seconds):
            what = f"invalid duration {shown(value)}" if isinstance(value, str) else f"{got(value)}"
            ctx.add(loc, f"{what}: expected a duration such as '500ms', '30s', '10m' or '1h30m'")
            return None
        if seconds < 0:
            ctx.add(loc, f"must not be negative, got {value}")
            return None
        if seconds < self.minimum:
            ctx.add(loc, f"must be at least {format_duration(self.minimum)}, got {value}")
            return None
        if self.maximum is not None and seconds > self.maximum:
            ctx.add(loc, f"must be at most {format_duration(self.maximum)}, got {value}")
            return None
        return seconds

    def json_schema(self) -> JSON:
        return {"type": "string", "pattern": DURATION_PATTERN}

    def doc(self) -> str:
        rng = ""
        if self.minimum or self.maximum is not None:
            hi = format_duration(self.maximum) if self.maximum is not None else ""
            rng = f" {format_duration(self.minimum)}..{hi}"
        return "duration" + rng

    def show(self, value: Any) -> str:
        return format_duration(value)

    def to_yaml(self, value: Any) -> Any:
        return format_duration(value)


@dataclass
class Str(Type):
    format: Format | None = None
    enum: Sequence[str] = ()
    secret: bool = False

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        if not isinstance(value, str):
            ctx.add(loc, f"expected a string, {got(value, secret=self.secret)}")
            return None
        if self.enum and value not in self.enum:
            if len(self.enum) == 1:
                ctx.add(loc, f"must be {self.enum[0]!r}, got {shown(value)}")
            else:
                choices = ", ".join(repr(e) for e in self.enum)
                ctx.add(loc, f"must be one of {choices}; got {shown(value)}")
            return None
        if self.format is not None and (err := self.format.check(value)):
            ctx.add(loc, err)
            return None
        return value

    def json_schema(self) -> JSON:
        if len(self.enum) == 1:
            return {"const": self.enum[0]}
        if self.enum:
            return {"enum": list(self.enum)}
        s: JSON = {"type": "string"}
        if self.format is not None and self.format.pattern:
            s["pattern"] = self.format.pattern
        return s

    def doc(self) -> str:
        if self.enum:
            return " | ".join(f"`{e}`" for e in self.enum)
        return f"string ({self.format.description})" if self.format else "string"

    def show(self, value: Any) -> str:
        return "(not shown)" if self.secret else repr(value) if value == "" else str(value)


@dataclass
class List(Type):
    """A YAML sequence. ``scalar_ok`` also accepts a single item written without a list."""

    item: Type
    min_items: int = 0
    max_items: int | None = None
    scalar_ok: bool = False
    unique: Callable[[Any], Any] | None = None  # key of an item; two items with equal keys are flagged
    unique_message: str = "duplicate of {first}"
    noun: str = "item"  # for show(): "3 images"
    unique_at: str | None = None  # report duplicates at this key of the item (``images.prefetch[2].image``)

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        if value is None:  # "prefetch:" with nothing under it
            value = []
        if self.scalar_ok and not isinstance(value, list):
            value = [value]
            single = True
        else:
            single = False
        if not isinstance(value, list):
            ctx.add(loc, f"expected a list, {got(value, secret=self.item.secret)}")
            return None
        if len(value) < self.min_items:
            ctx.add(loc, f"must list at least {self.min_items} item{'s' if self.min_items > 1 else ''}")
            return None
        if self.max_items is not None and len(value) > self.max_items:
            ctx.add(loc, f"must list at most {self.max_items} items, got {len(value)}")
            return None
        out = []
        seen: dict[Any, Loc] = {}
        for i, v in enumerate(value):
            item_loc = loc if single else loc.item(i)
            checked = self.item.check(v, item_loc, ctx)
            if checked is None:
                continue
            if self.unique is not None:
                key = self.unique(checked)
                if key in seen:
                    at = item_loc.field(self.unique_at) if self.unique_at else item_loc
                    ctx.add(at, self.unique_message.format(first=seen[key].text))
                    continue
                seen[key] = item_loc
            out.append(checked)
        return tuple(out)

    def json_schema(self) -> JSON:
        s: JSON = {"type": "array", "items": self.item.json_schema()}
        if self.min_items:
            s["minItems"] = self.min_items
        if self.max_items is not None:
            s["maxItems"] = self.max_items
        if self.scalar_ok:
            return {"anyOf": [self.item.json_schema(), s]}
        return s

    def doc(self) -> str:
        return f"list of {self.item.doc()}" + (" (or one)" if self.scalar_ok else "")

    def show(self, value: Any) -> str:
        if isinstance(self.item, Str) and not self.item.secret:
            return "[" + ", ".join(value) + "]"
        if not value:
            return "none"
        return f"{len(value)} {self.noun}{'' if len(value) == 1 else 's'}"

    def to_yaml(self, value: Any) -> Any:
        return [self.item.to_yaml(v) for v in value]


@dataclass
class Map(Type):
    """A YAML mapping with user-chosen keys (registries, header names): an ordered tuple of pairs."""

    key: Format
    value: Type
    max_items: int | None = None
    key_identity: Callable[[str], str] | None = None  # keys equal under this are duplicates

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        if value is None:  # "mirrors:" with nothing under it
            value = {}
        if not isinstance(value, dict):
            ctx.add(loc, f"expected a mapping, {got(value)}")
            return None
        if self.max_items is not None and len(value) > self.max_items:
            ctx.add(loc, f"must have at most {self.max_items} entries, got {len(value)}")
            return None
        out = []
        seen: dict[str, Loc] = {}
        for k, v in value.items():
            entry = loc.entry(str(k))
            if err := self.key.check(str(k)):
                ctx.add(entry, err, key=True)
                continue
            if self.key_identity is not None:
                ident = self.key_identity(str(k))
                if ident in seen:
                    ctx.add(entry, f"same key as {seen[ident].text}", key=True)
                    continue
                seen[ident] = entry
            checked = self.value.check(v, entry, ctx)
            if checked is not None:
                out.append((str(k), checked))
        return tuple(out)

    def json_schema(self) -> JSON:
        s: JSON = {"type": "object", "additionalProperties": self.value.json_schema()}
        if self.key.pattern:
            s["propertyNames"] = {"pattern": self.key.pattern}
        if self.max_items is not None:
            s["maxProperties"] = self.max_items
        return s

    def doc(self) -> str:
        return f"map of {self.key.name} to {self.value.doc()}"

    def show(self, value: Any) -> str:
        if not value:
            return "none"
        return ", ".join(f"{k} ({self.value.show(v)})" for k, v in value)

    def to_yaml(self, value: Any) -> Any:
        return {k: self.value.to_yaml(v) for k, v in value}
