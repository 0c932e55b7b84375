"""What is wrong with a config, and where: ``Problem``, ``ConfigError`` and the location helpers
(``Loc``, ``Ctx``) that every check uses to collect problems with their YAML line.

Imports nothing else of nodeagent, so anything that reports a config problem can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
