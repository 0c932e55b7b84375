"""Objects of the config schema: YAML mappings with fixed keys, each built into a model dataclass.

Defaults are declared once, on the model dataclasses (``nodeagent.config.model``): an ``Object`` reads
its fields' defaults from its model, so ``CriConfig()`` and a config that omits ``cri`` agree by
construction, and the JSON Schema and docs show the same values (``Type.to_yaml``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.config.problems import Ctx, Loc
from nodeagent.config.types import JSON, List, Type, got

_NO_DEFAULT = object()


@dataclass
class Field:
    """One key of an object: YAML name, model attribute, type and description. The default comes
    from the model (``default`` is filled in, in YAML form, by the ``Object`` holding the field)."""

    key: str
    attr: str
    type: Type
    description: str
    required: bool = False
    examples: Sequence[Any] = ()
    default: Any = field(default=None, init=False)  # YAML form, for docs and the JSON Schema
    model_default: Any = field(default=_NO_DEFAULT, init=False, repr=False)  # as the model holds it

    def default_value(self) -> Any:
        """The default as the model holds it (durations in seconds, lists as tuples); None if none."""
        return None if self.model_default is _NO_DEFAULT else self.model_default


def _model_defaults(model: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(model):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@dataclass
class Object(Type):
    """A YAML mapping with fixed keys, built into ``model`` (through ``build`` when the model has
    fields derived from several keys). A field the model does not hold (``apiVersion``) is checked
    only."""

    fields: Sequence[Field]
    model: type
    description: str = ""
    build: Callable[..., Any] | None = None
    _attrs: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._attrs = frozenset(f.name for f in dataclasses.fields(self.model))
        defaults = _model_defaults(self.model)
        for f in self.fields:
            if f.attr in defaults:
                f.model_default = defaults[f.attr]
                if defaults[f.attr] is not None and not isinstance(f.type, Object):
                    f.default = f.type.to_yaml(defaults[f.attr])

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
                continue  # the model's default
            if f.attr not in self._attrs:
                continue  # checked only (apiVersion, kind): not part of the model
            if checked is not None:
                kwargs[f.attr] = checked
            elif f.required:
                missing = True
        if missing:
            return None
        return (self.build or self.model)(**kwargs)

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
