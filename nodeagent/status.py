"""``nodeagent status``: the operator's first look at a node, from files only.

Reads the daemon's status file (``Paths.daemon_status_file``, rewritten by ``nodeagent run`` at
least every 15 seconds) and the last apply report (``Paths.apply_report_file``); never the
metrics text and never the CRI socket, so it answers instantly even when containerd is wedged.
A section may carry ``summary`` (a list of lines) to be shown instead of a generic dump.
Degraded (exit 1) when the daemon is not running (its process is gone) or its file is stale, the
upstream CRI does not answer, the last apply had errors, or a feature section reports
``degraded: true``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent import humanize
from nodeagent.paths import Paths

STALE_AFTER_HEARTBEATS = 6


@dataclass
class Report:
    daemon: dict[str, Any] | None
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
            "daemon": self.daemon,
            "daemonError": self.daemon_error,
            "apply": self.apply,
            "applyError": self.apply_error,
            "applyFileTime": self.apply_mtime,
        }


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


def _process_gone(pid: Any, started_at: Any) -> str | None:
    """Why the daemon that wrote the file is not running (killed, crashed), or None if it is."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return f"process {pid} is gone"
    except psutil.Error:
        return None
    if isinstance(started_at, int | float) and created > started_at + 5:
        return f"process {pid} is gone (the pid now belongs to a newer process)"
    return None


def collect(paths: Paths, now: float | None = None) -> Report:
    now = time.time() if now is None else now
    daemon, daemon_err, _ = _read_json(paths.daemon_status_file)
    apply, apply_err, apply_mtime = _read_json(paths.apply_report_file)
    r = Report(daemon, daemon_err, apply, apply_err, apply_mtime, now)
    if daemon is None:
        r.problems.append(f"daemon: no status ({daemon_err}); is nodeagent run running?")
    else:
        state = daemon.get("state")
        updated = daemon.get("updatedAt")
        beat = float(daemon.get("heartbeatSeconds") or 5.0)
        gone = _process_gone(daemon.get("pid"), daemon.get("startedAt"))
        if state != "running":
            r.problems.append(f"daemon: {state or 'unknown state'}")
        elif gone:
            r.problems.append(f"daemon: {gone}; the status file is from a process that no longer runs")
        elif not isinstance(updated, int | float) or now - updated > STALE_AFTER_HEARTBEATS * beat:
            age = f"{now - updated:.0f}s old" if isinstance(updated, int | float) else "no timestamp"
            r.problems.append(f"daemon: status file is stale ({age}); the daemon is not running or hung")
        else:
            proxy = daemon.get("proxy") or {}
            if proxy.get("upstreamOk") is False:
                upstream, err = proxy.get("upstream", "?"), proxy.get("upstreamError", "")
                r.problems.append(f"upstream CRI {upstream} not answering: {err}")
            for name, section in sorted((daemon.get("sections") or {}).items()):
                if isinstance(section, dict) and section.get("degraded"):
                    r.problems.append(f"{name}: degraded")
                elif isinstance(section, dict) and section.get("error"):
                    r.problems.append(f"{name}: {section['error']}")
    if apply is not None:
        for err in apply.get("errors") or []:
            r.problems.append(f"apply: {err}")
    elif apply_err and not apply_err.endswith("not found"):
        r.problems.append(f"apply: {apply_err}")
    return r


def _size(n: float | int | None) -> str:
    return "-" if n is None else humanize.size(n, binary=True)


def _ago(now: float, t: Any) -> str:
    return humanize.ago(now - t) if isinstance(t, int | float) else "-"


def render(r: Report) -> str:
    out: list[str] = []
    add = out.append
    d = r.daemon
    if d is None:
        add(f"daemon         not running ({r.daemon_error})")
    else:
        add(
            f"daemon         {d.get('state', '?')} (pid {d.get('pid', '?')}, version "
            f"{d.get('nodeagentVersion', '?')}, started {_ago(r.now, d.get('startedAt'))}, "
            f"status written {_ago(r.now, d.get('updatedAt'))})"
        )
        p = d.get("proxy") or {}
        up = {True: "answering", False: "NOT ANSWERING", None: "not checked yet"}.get(
            p.get("upstreamOk"), "?"
        )
        add(f"upstream CRI   {p.get('upstream', '?')}: {up}")
        sock = p.get("socket")
        origin = " (from systemd: nodeagent.socket)" if p.get("socketInherited") else ""
        add(f"proxy socket   {sock + origin if sock else '(proxy off)'}")
        add(f"metrics        {(d.get('metrics') or {}).get('listen') or '-'}")
        c = d.get("cache") or {}
        if c:
            ratio = c.get("imagefsUsedRatio")
            fs = f"{ratio * 100:.0f}% used" if isinstance(ratio, int | float) else "usage unknown"
            add(
                f"image cache    {c.get('images', '?')} images, {_size(c.get('bytes'))}; imagefs {fs}"
                f" ({c.get('imagefsPath') or '?'})"
            )
        pulls = d.get("pulls") or {}
        totals = pulls.get("totals") or {}
        summary = ", ".join(f"{k} {v}" for k, v in sorted(totals.items())) or "none yet"
        add(f"pulls          {summary}; in flight {pulls.get('inFlight', 0)}")
        recent = pulls.get("recent") or []
        if recent:
            add("recent pulls")
            add(f"  {'WHEN':<9} {'RESULT':<13} {'SECONDS':>8} {'SIZE':>10}  IMAGE")
            for p in reversed(recent[-10:]):
                add(
                    f"  {_ago(r.now, p.get('started_at')):<9} {p.get('result', '?'):<13} "
                    f"{p.get('duration', 0):>8.2f} {_size(p.get('bytes')):>10}  {p.get('image', '?')}"
                )
        for name, section in sorted((d.get("sections") or {}).items()):
            add(f"{name}")
            if not isinstance(section, dict):
                continue
            lines = section.get("summary")
            if isinstance(lines, list) and all(isinstance(x, str) for x in lines):
                for text in lines:  # the feature's own lines (the JSON keeps every field)
                    add(f"  {text}")
                continue
            for key, value in section.items():
                if isinstance(value, list):
                    add(f"  {key}: {len(value)}")
                    for item in value[-10:]:
                        add(f"    {json.dumps(item, sort_keys=True, default=str)}")
                else:
                    add(f"  {key}: {json.dumps(value, default=str)}")
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
