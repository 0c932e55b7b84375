"""``nodeagent status``: the operator's first look at a node, from files only.

Reads the daemon's status file (``Paths.daemon_status_file``, rewritten by ``nodeagent run`` at
least every 15 seconds; its model is ``nodeagent/run/statusfile.py``, shared with the daemon that writes
it) and the last apply report (``Paths.apply_report_file``); never the metrics text and never the
CRI socket, so it answers instantly even when containerd is wedged. Every part is shown with how
old its figures are. A section's ``summary`` lines are shown instead of a generic dump.
Degraded (exit 1) when the daemon is not running (its process is gone) or its file is stale or
unreadable, the upstream CRI does not answer, the last apply had errors, or a feature section
reports ``degraded: true`` or an ``error``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.run.statusfile import DaemonStatus, StatusFileError, read
from nodeagent.util import humanize
from nodeagent.util.paths import Paths

STALE_AFTER_HEARTBEATS = 6


@dataclass
class Report:
    daemon: DaemonStatus | None
    daemon_error: str | None
    apply: dict[str, Any] | None
    apply_error: str | None
    apply_mtime: float | None
    now: float
    problems: list[str] = field(default_factory=list)

    @property
    def degraded(self) -> bool:
        return bool(self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "healthy": not self.degraded,
            "problems": self.problems,
            "daemon": None if self.daemon is None else self.daemon.to_json(),
            "daemonError": self.daemon_error,
            "apply": self.apply,
            "applyError": self.apply_error,
            "applyFileTime": self.apply_mtime,
        }


def _read_daemon(path: Path) -> tuple[DaemonStatus | None, str | None]:
    try:
        return read(path)[0], None
    except FileNotFoundError:
        return None, f"{path}: not found"
    except OSError as e:
        return None, f"{path}: cannot read: {e.strerror}"
    except StatusFileError as e:
        return None, str(e)


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None, float | None]:
    try:
        raw = path.read_text(encoding="utf-8")
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None, f"{path}: not found", None
    except OSError as e:
        return None, f"{path}: cannot read: {e.strerror}", None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"{path}: not valid JSON ({e.msg}, line {e.lineno})", mtime
    if not isinstance(data, dict):
        return None, f"{path}: expected a JSON object", mtime
    return data, None, mtime


def _process_gone(pid: int, started_at: float) -> str | None:
    """Why the daemon that wrote the file is not running (killed, crashed), or None if it is."""
    if pid <= 0:
        return None
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return f"process {pid} is gone"
    except psutil.Error:
        return None
    if created > started_at + 5:
        return f"process {pid} is gone (the pid now belongs to a newer process)"
    return None


def collect(paths: Paths, now: float | None = None) -> Report:
    now = time.time() if now is None else now
    daemon, daemon_err = _read_daemon(paths.daemon_status_file)
    apply, apply_err, apply_mtime = _read_json(paths.apply_report_file)
    r = Report(daemon, daemon_err, apply, apply_err, apply_mtime, now)
    if daemon is None:
        r.problems.append(f"daemon: no status ({daemon_err}); is nodeagent run running?")
    elif daemon.state != "running":
        r.problems.append(f"daemon: {daemon.state}")
    elif gone := _process_gone(daemon.pid, daemon.started_at):
        r.problems.append(f"daemon: {gone}; the status file is from a process that no longer runs")
    elif now - daemon.updated_at > STALE_AFTER_HEARTBEATS * daemon.heartbeat_seconds:
        r.problems.append(
            f"daemon: status file is stale ({now - daemon.updated_at:.0f}s old); the daemon is not "
            "running or hung"
        )
    else:
        proxy = daemon.proxy
        if proxy.upstream_ok is False:
            r.problems.append(f"upstream CRI {proxy.upstream} not answering: {proxy.upstream_error}")
        for name, section in sorted(daemon.sections.items()):
            if section.degraded:
                r.problems.append(f"{name}: degraded")
            elif section.error:
                r.problems.append(f"{name}: {section.error}")
    if apply is not None:
        for err in apply.get("errors") or []:
            r.problems.append(f"apply: {err}")
    elif apply_err and not apply_err.endswith("not found"):
        r.problems.append(f"apply: {apply_err}")
    return r


def _size(n: float | int | None) -> str:
    return "-" if n is None else humanize.size(n, binary=True)


def _ago(now: float, t: float | None) -> str:
    return humanize.ago(now - t) if isinstance(t, int | float) else "-"


def render(r: Report) -> str:
    out: list[str] = []
    add = out.append
    d = r.daemon
    if d is None:
        add(f"daemon         not running ({r.daemon_error})")
    else:
        _render_daemon(d, r.now, add)
    if r.apply is not None:
        warnings = r.apply.get("warnings") or []
        errors = r.apply.get("errors") or []
        add(
            f"last apply     {r.apply.get('result', '?')} ({_ago(r.now, r.apply_mtime)}, flavor "
            f"{r.apply.get('flavor', '?')}, {len(r.apply.get('changed') or [])} files changed, "
            f"{len(warnings)} warnings, {len(errors)} errors)"
        )
        snap = r.apply.get("snapshotter")
        if snap:
            mode = r.apply.get("pull_mode")
            add(f"snapshotter    {snap}" + (f" (pull mode {mode})" if mode else ""))
        for w in warnings:
            add(f"  warning: {w}")
        for e in errors:
            add(f"  error: {e}")
    else:
        add(f"last apply     none ({r.apply_error})")
    if r.problems:
        add("DEGRADED")
        for p in r.problems:
            add(f"  - {p}")
    else:
        add("healthy")
    return "\n".join(out) + "\n"


def _render_daemon(d: DaemonStatus, now: float, add: Any) -> None:
    add(
        f"daemon         {d.state} (pid {d.pid}, version {d.nodeagent_version}, started "
        f"{_ago(now, d.started_at)}, status written {_ago(now, d.updated_at)})"
    )
    p = d.proxy
    up = {True: "answering", False: "NOT ANSWERING", None: "not checked yet"}[p.upstream_ok]
    checked = f" (checked {_ago(now, p.upstream_checked_at)})" if p.upstream_checked_at is not None else ""
    add(f"upstream CRI   {p.upstream}: {up}{checked}")
    origin = " (from systemd: nodeagent.socket)" if p.socket_inherited else ""
    add(f"proxy socket   {p.socket + origin if p.socket else '(proxy off)'}")
    add(f"metrics        {d.metrics.listen or '-'}")
    c = d.cache
    if c is None:
        add("image cache    not measured yet")
    else:
        ratio = c.imagefs_used_ratio
        fs = f"{ratio * 100:.0f}% used" if ratio is not None else "usage unknown"
        add(
            f"image cache    {c.images} images, {_size(c.bytes)}; imagefs {fs} ({c.imagefs_path or '?'}); "
            f"measured {_ago(now, c.at)}"
        )
    pulls = d.pulls
    summary = ", ".join(f"{k} {v}" for k, v in sorted(pulls.totals.items())) or "none yet"
    add(f"pulls          {summary}; in flight {pulls.in_flight}")
    if pulls.recent:
        add("recent pulls")
        add(f"  {'WHEN':<9} {'RESULT':<13} {'SECONDS':>8} {'SIZE':>10}  IMAGE")
        for rec in reversed(pulls.recent[-10:]):
            add(
                f"  {_ago(now, rec.started_at):<9} {rec.result:<13} "
                f"{rec.duration:>8.2f} {_size(rec.bytes):>10}  {rec.image}"
            )
    for name, w in sorted(d.workers.items()):
        if w.state != "running" or w.restarts:
            err = f"; last error: {w.last_error}" if w.last_error else ""
            add(f"worker {name:<7} {w.state} since {_ago(now, w.since)}, {w.restarts} restarts{err}")
    for name, section in sorted(d.sections.items()):
        add(f"{name} (as of {_ago(now, section.at)})")
        if section.error:
            add(f"  error: {section.error}")
        if section.summary:
            for text in section.summary:  # the feature's own lines (the JSON keeps every field)
                add(f"  {text}")
            continue
        for key, value in section.fields.items():
            if isinstance(value, list):
                add(f"  {key}: {len(value)}")
                for item in value[-10:]:
                    add(f"    {json.dumps(item, sort_keys=True, default=str)}")
            else:
                add(f"  {key}: {json.dumps(value, default=str)}")
