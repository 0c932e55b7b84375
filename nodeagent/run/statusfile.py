"""The daemon's status file (``Paths.daemon_status_file``): one typed, versioned model.

``nodeagent run`` writes it (``nodeagent/run/statuswriter.py``: on every change, debounced, and
every ``heartbeatSeconds``); ``nodeagent status`` reads it back through the same dataclasses
(``read()``), so a field is named, typed and defaulted in one place. Keys in the JSON are the
camelCase of the field names, except a pull record's (``RecentPull``), whose keys are the
``PullRecord`` log fields. Every part carries the time it was measured: ``proxy.upstreamCheckedAt``,
``pulls.at``, ``cache.at``, ``workers.*.since``, ``sections.*.at``, and the file ``updatedAt``.

A feature's section (``Section``: eviction, mirrorHealth, podPulls) has the fields every section
has (``at``, ``degraded``, ``error``, ``summary``) and its own, kept as they are in ``fields`` and
written next to the common ones (the JSON stays flat).

This module imports nothing heavy (no grpc, no prometheus): ``nodeagent status`` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

VERSION = 2  # 2: every part carries its measurement time; cache is null until first measured
STATES = ("running", "stopped")
T = TypeVar("T")


class StatusFileError(ValueError):
    """The file is not a status file this nodeagent can read; the message names the path and key."""


@dataclass
class ProxyStatus:
    socket: str  # "" when the proxy is off (cri.proxySocket empty)
    socket_inherited: bool  # the socket came from systemd (nodeagent.socket)
    upstream: str
    upstream_ok: bool | None  # None: not checked yet
    upstream_error: str
    upstream_checked_at: float | None  # when upstream_ok was last measured


@dataclass
class MetricsStatus:
    listen: str | None  # host:port actually bound


@dataclass
class RecentPull:
    """One pull through the proxy (``PullRecord.to_json()``; credentials never part of it)."""

    image: str
    registry: str
    result: str
    duration: float
    started_at: float
    bytes: int
    image_ref: str = ""
    code: str = "OK"
    error: str = ""
    retry_reason: str | None = None
    origin: str = "kubelet"
    joined: bool = False
    throughput: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    JSON_KEYS: typing.ClassVar[str] = "snake"


@dataclass
class PullsStatus:
    at: float  # when these counts were taken
    in_flight: int
    totals: dict[str, int]  # by result
    recent: list[RecentPull]  # oldest first


@dataclass
class CacheStatus:
    at: float  # when the images were listed and the filesystem measured
    images: int
    bytes: int
    imagefs_used_ratio: float | None  # None when the image filesystem could not be measured
    imagefs_path: str
    source: str  # who measured: "daemon" (after pulls, every minute) or "eviction" (each cycle)


@dataclass
class WorkerStatus:
    state: str  # running | restarting | exited | stopped
    restarts: int
    last_error: str | None
    since: float  # when it entered this state


@dataclass
class Section:
    """A feature's part of the file (``Daemon.add_status_hook``)."""

    at: float  # when the feature measured what it reports (else when it was asked)
    degraded: bool = False  # true: `nodeagent status` exits 1
    error: str = ""  # the hook failed, or the feature reports a problem
    summary: list[str] = field(default_factory=list)  # lines shown instead of a generic dump
    fields: dict[str, Any] = field(default_factory=dict)  # the feature's own keys, written flat

    COMMON: typing.ClassVar[tuple[str, ...]] = ("at", "degraded", "error", "summary")

    @classmethod
    def of(cls, data: dict[str, Any], at: float) -> Section:
        """A section from a hook's dict: the common keys taken out (``at`` defaults to ``at``)."""
        return _section(dict(data), "section", at)


@dataclass
class DaemonStatus:
    version: int
    nodeagent_version: str
    state: str  # running | stopped
    pid: int
    started_at: float
    updated_at: float  # when the file was written
    heartbeat_seconds: float  # it is rewritten at least this often while running
    proxy: ProxyStatus
    metrics: MetricsStatus
    pulls: PullsStatus
    cache: CacheStatus | None
    workers: dict[str, WorkerStatus]
    sections: dict[str, Section]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _encode(self)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_json(cls, data: Any, where: str = "status") -> DaemonStatus:
        """Raises ``StatusFileError`` naming the key that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise StatusFileError(f"{where}: expected a JSON object")
        version = data.get("version")
        if version != VERSION:
            raise StatusFileError(
                f"{where}: version {version!r} (written by nodeagent {data.get('nodeagentVersion', '?')}); "
                f"this nodeagent reads version {VERSION}: restart the daemon (systemctl restart nodeagent)"
            )
        out: DaemonStatus = _decode(cls, data, where)
        if out.state not in STATES:
            raise StatusFileError(f"{where}: state: {out.state!r} is not one of {', '.join(STATES)}")
        return out


def read(path: Path) -> tuple[DaemonStatus, float]:
    """The status file and its mtime. Raises ``FileNotFoundError``, ``OSError`` or
    ``StatusFileError`` (not JSON, wrong version, a key missing or mistyped)."""
    raw = path.read_text(encoding="utf-8")
    mtime = path.stat().st_mtime
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StatusFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return DaemonStatus.from_json(data, str(path)), mtime


# --- JSON <-> dataclasses (only what this model uses) ---------------------------------------------
def _key(cls: type, name: str) -> str:
    if getattr(cls, "JSON_KEYS", "camel") == "snake":
        return name
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _encode(value: Any) -> Any:
    if isinstance(value, Section):
        out = {k: _encode(v) for k, v in value.fields.items()}
        out.update(at=value.at, degraded=value.degraded, error=value.error, summary=list(value.summary))
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {_key(cls, f.name): _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _section(data: dict[str, Any], where: str, at: float | None = None) -> Section:
    common = {k: data.pop(k) for k in Section.COMMON if k in data}
    if at is not None:
        common.setdefault("at", at)
    return Section(
        at=_convert(float, common.get("at"), f"{where}.at"),
        degraded=_convert(bool, common.get("degraded", False), f"{where}.degraded"),
        error=_convert(str, common.get("error", "") or "", f"{where}.error"),
        summary=_convert(list[str], common.get("summary", []), f"{where}.summary"),
        fields=data,
    )


def _decode(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise StatusFileError(f"{where}: expected an object, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = _key(cls, f.name)
        if key in data:
            kwargs[f.name] = _convert(hints[f.name], data[key], f"{where}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise StatusFileError(f"{where}.{key}: missing")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if tp is Section:
        if not isinstance(value, dict):
            raise StatusFileError(f"{where}: expected an object, got {_kind(value)}")
        return _section(dict(value), where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise StatusFileError(f"{where}: expected a list, got {_kind(value)}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise StatusFileError(f"{where}: expected an object, got {_kind(value)}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise StatusFileError(f"{where}: expected {tp.__name__}, got {_kind(value)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
