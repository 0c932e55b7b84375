"""The building blocks of the config schema (``nodeagent.config.schema``).

Each type checks a value parsed from YAML, collects problems (never stops at the first) and returns the
typed value for ``nodeagent.config.model``; the same object renders its JSON Schema and its one-line
description for docs. On a problem the type returns a placeholder (the field's default) so that the
rest of the config is still checked; the loader raises at the end when anything was wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.config.formats import DURATION_PATTERN, Format, format_duration, parse_duration

JSON = dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config; prints as ``path.to.key: message (line N)``."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.path}: {self.message}{where}"


class ConfigError(Exception):
    """The config is invalid; ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(str(p) for p in problems))


Parts = tuple[str | int, ...]


def quote_key(key: str) -> str:
    """A user-chosen map key inside a path: ``["docker.io"]``; control characters escaped, bounded."""
    out = []
    for c in key[:80]:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return '["' + "".join(out) + ('..."]' if len(key) > 80 else '"]')


@dataclass(frozen=True)
class Loc:
    """Where a value sits: ``parts`` indexes the parsed document, ``text`` is what users read."""

    parts: Parts = ()
    text: str = ""

    def field(self, key: str) -> Loc:
        return Loc((*self.parts, key), f"{self.text}.{key}" if self.text else key)

    def entry(self, key: str) -> Loc:
        return Loc((*self.parts, key), self.text + quote_key(key))

    def item(self, index: int) -> Loc:
        return Loc((*self.parts, index), f"{self.text}[{index}]")


@dataclass
class Ctx:
    """Problems found so far, and the YAML line of every value and key (by ``Loc.parts``)."""

    source: str = "<string>"
    value_lines: dict[Parts, int] = field(default_factory=dict)
    key_lines: dict[Parts, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    bad: set[str] = field(default_factory=set)

    def line(self, loc: Loc, *, key: bool = False) -> int | None:
        parts = loc.parts
        while True:
            found = (self.key_lines if key else self.value_lines).get(parts)
            if found is not None:
                return found
            if not parts:
                return None
            parts = parts[:-1]
            key = False

    def add(self, loc: Loc, message: str, *, key: bool = False, line: int | None = None) -> None:
        self.problems.append(
            Problem(loc.text, message, line if line is not None else self.line(loc, key=key))
        )
        self.bad.add(loc.text)


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


@dataclass
class Field:
    """One key of an object: YAML name, model attribute, type, default (in YAML form) and description."""

    key: str
    attr: str
    type: Type
    description: str
    default: Any = None
    required: bool = False
    examples: Sequence[Any] = ()

    def default_value(self) -> Any:
        """The default as the model holds it (durations in seconds, lists as tuples)."""
        if self.default is None:
            return self.type.check({}, Loc(), Ctx()) if isinstance(self.type, Object) else None
        ctx = Ctx()
        value = self.type.check(self.default, Loc(), ctx)
        if ctx.problems:  # a schema bug, caught by the unit tests
            raise AssertionError(f"default of {self.key} is invalid: {ctx.problems}")
        return value


@dataclass
class Object(Type):
    """A YAML mapping with fixed keys, built into a model dataclass (``build``)."""

    fields: Sequence[Field]
    build: Callable[..., Any]
    description: str = ""

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        if value is None and not any(f.required for f in self.fields):
            value = {}  # "kubelet:" with nothing under it
        if not isinstance(value, dict):
            ctx.add(loc, f"expected a mapping, {got(value)}")
            return None
        by_key = {f.key: f for f in self.fields}
        for k in value:
            if k not in by_key:
                ctx.add(loc.field(str(k)), unknown_key_message(str(k), list(by_key)), key=True)
        kwargs: dict[str, Any] = {}
        missing = False
        for f in self.fields:
            floc = loc.field(f.key)
            if f.key in value:
                checked = f.type.check(value[f.key], floc, ctx)
            elif f.required:
                ctx.add(floc, "required key is missing", line=ctx.line(loc))
                checked = None
            else:
                checked = f.default_value()
            if checked is None:
                checked = f.default_value()
            if checked is None and f.required:
                missing = True
            elif checked is not None:
                kwargs[f.attr] = checked
        return None if missing else self.build(**kwargs)

    def json_schema(self) -> JSON:
        props: JSON = {}
        for f in self.fields:
            s = dict(f.type.json_schema())
            s["description"] = f.description
            if f.default is not None and not f.required:
                s["default"] = f.default
            if f.examples:
                s["examples"] = list(f.examples)
            props[f.key] = s
        out: JSON = {"type": "object", "additionalProperties": False, "properties": props}
        required = [f.key for f in self.fields if f.required]
        if required:
            out["required"] = required
        if self.description:
            out["description"] = self.description
        return out

    def doc(self) -> str:
        return "mapping"

    def show(self, value: Any) -> str:
        return "(set)"


def unknown_key_message(key: str, known: list[str]) -> str:
    import difflib

    lowered = {k.lower(): k for k in known}
    if key.lower() in lowered:
        return f"unknown key (did you mean {lowered[key.lower()]!r}?)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return "unknown key (expected one of: " + ", ".join(known) + ")"


@dataclass
class CheckedObject(Object):
    """An ``Object`` with a rule over its own keys (``rule(built, loc, ctx)`` adds problems)."""

    rule: Callable[[Any, Loc, Ctx], None] | None = None

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        before = len(ctx.problems)
        built = super().check(value, loc, ctx)
        if built is not None and self.rule is not None and len(ctx.problems) == before:
            self.rule(built, loc, ctx)
        return built


@dataclass
class ListOrObject(Type):
    """Either a short form (a YAML sequence, ``short``) or a long form (a mapping, ``long``); both are
    built into what ``long`` builds (``from_short`` wraps the short form's value)."""

    short: List
    long: Object
    from_short: Callable[[Any], Any]
    shown: Callable[[Any], str] | None = None

    def check(self, value: object, loc: Loc, ctx: Ctx) -> Any:
        if isinstance(value, dict):
            return self.long.check(value, loc, ctx)
        checked = self.short.check(value, loc, ctx)
        return None if checked is None else self.from_short(checked)

    def json_schema(self) -> JSON:
        return {"anyOf": [self.short.json_schema(), self.long.json_schema()]}

    def doc(self) -> str:
        return f"{self.short.doc()}, or a mapping"

    def show(self, value: Any) -> str:
        return self.shown(value) if self.shown is not None else self.long.show(value)
