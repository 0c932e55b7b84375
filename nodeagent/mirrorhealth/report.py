"""Mirror health's section of the daemon status file, and the line per mirror ``nodeagent status``
shows (absolute times: the file is read later)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from nodeagent.mirrorhealth.state import Health
from nodeagent.mirrorhealth.watched import WatchedMirror


def section(mirrors: Sequence[WatchedMirror], mirror_only: frozenset[str]) -> dict[str, Any]:
    """``at`` is the time of the latest probe (absent before the first)."""
    out = []
    for e in mirrors:
        item: dict[str, Any] = {
            "registry": e.registry,
            "mirror": e.label,
            "state": e.state.health.value,
            "inHostsToml": e.in_file,
            "consecutiveFailures": e.state.failures,
            "consecutiveSuccesses": e.state.successes,
            "transitions": e.state.transitions,
            "since": e.last_change_wall,
            "authOk": e.last is None or e.last.auth_ok is not False,
        }
        if e.source is not None:  # where the credentials come from and how they fare; no secret
            item["credentials"] = {
                "source": e.source.describe(),
                "present": e.auth is not None,
                "fetchedAt": e.auth_wall,
                "refreshes": e.auth_refreshes,
                "error": e.auth_error,
            }
        if e.last is not None:
            item["lastProbe"] = {
                "at": e.last_probe_wall,
                "alive": e.last.alive,
                "status": e.last.status,
                "error": e.last.error,
                "durationSeconds": round(e.last.duration, 4),
            }
        out.append(item)
    result: dict[str, Any] = {
        "mirrors": out,
        "degraded": any(e.state.health is Health.DOWN for e in mirrors),
        "summary": [summary_line(e, mirror_only) for e in mirrors],
    }
    probed = [e.last_probe_wall for e in mirrors if e.last_probe_wall is not None]
    if probed:
        result["at"] = max(probed)
    return result


def summary_line(e: WatchedMirror, mirror_only: frozenset[str]) -> str:
    """One line per mirror for ``nodeagent status`` (absolute times: the file is read later)."""
    state = e.state.health.value.upper()
    since = (
        time.strftime(" since %H:%M:%SZ", time.gmtime(e.last_change_wall))
        if e.last_change_wall is not None
        else ""
    )
    if e.last is None:
        probe = "not probed yet"
    elif e.last.alive:
        probe = f"last probe HTTP {e.last.status} in {e.last.duration * 1000:.0f} ms"
    else:
        probe = f"last probe failed: {e.last.error}"
    streak = (
        f"{e.state.failures} failures in a row" if e.state.failures else f"{e.state.successes} good in a row"
    )
    where = "in hosts.toml" if e.in_file else "out of hosts.toml"
    if e.in_file and e.state.health is Health.DOWN and e.registry in mirror_only:
        where += " (mirror-only: the last mirror is never taken out; pulls fail fast)"
    auth = ""
    if e.last is not None and e.last.auth_ok is False:
        auth = "; credentials: " + ("refused" if e.writable() else f"unavailable ({e.auth_error})")
    return f"{e.registry}  {e.label}  {state}{since}; {probe}{auth}; {streak}; {where}"
