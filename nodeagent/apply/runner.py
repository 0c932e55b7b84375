"""The apply runner: render every target of a flavor, then write only what changed.

1. Render all targets (pure). If any target cannot render (unsafe registry name, unreadable
   containerd config), nothing at all is written and apply fails.
2. Per target, per file: skip when the bytes already match (a second apply writes nothing); keep one
   backup ``<file>.nodeagent.bak`` before first replacing a file nodeagent did not create; write
   through ``nodeagent.util.atomicio.write_atomic`` (a kill at any moment leaves old or new content,
   never a mix). Remove our own stale files (only those carrying the ownership marker). A failing
   target is reported and the others still run.
3. generic flavor: when containerd's config changed, restart containerd with
   ``containerd.restartCommand``; if CRI Version does not answer afterwards, restore the previous
   config, restart again and fail (``nodeagent.apply.restarts``).
4. Record changed files, warnings and errors in ``Paths.apply_report_file`` for ``nodeagent status``.

``--dry-run`` prints a unified diff per file and writes nothing (not even the report).
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from nodeagent.apply.facts import NodeFacts, missing_mirror_cas
from nodeagent.apply.restarts import (
    Restarter,
    restart_containerd,
    restart_skip_reason,
    restart_soci,
    restart_with_rollback,
)
from nodeagent.apply.targets import DesiredFile, TargetError, TargetPlan, is_owned
from nodeagent.apply.targets import containerd as containerd_target
from nodeagent.apply.targets import kubelet as kubelet_target
from nodeagent.apply.targets import mirrors as mirrors_target
from nodeagent.apply.targets import nodeadm as nodeadm_target
from nodeagent.apply.targets import soci as soci_target
from nodeagent.apply.tuning import resolve
from nodeagent.config.model import Config
from nodeagent.config.warnings import config_warnings
from nodeagent.util.atomicio import read_bytes_or_none, remove_durably, write_atomic
from nodeagent.util.paths import Paths

FLAVORS = ("eks-al2023", "generic")
BACKUP_SUFFIX = ".nodeagent.bak"

Renderer = Callable[[Config, NodeFacts], TargetPlan]

TARGETS: dict[str, tuple[Renderer, ...]] = {
    "generic": (kubelet_target.render, soci_target.render, containerd_target.render, mirrors_target.render),
    "eks-al2023": (soci_target.render_eks, nodeadm_target.render, mirrors_target.render),
}


@dataclass
class ApplyReport:
    flavor: str
    dry_run: bool = False
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    backups: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tuning: list[dict[str, object]] = field(default_factory=list)
    containerd_restarted: bool = False
    snapshotter: str = ""  # containerd.snapshotter as applied (nodeagent status shows it)
    pull_mode: str = ""  # containerd.soci.pullMode when the snapshotter is soci

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> str:
        return json.dumps({"result": "ok" if self.ok else "failed", **asdict(self)}, indent=2) + "\n"

    def write(self, paths: Paths) -> None:
        """Save for ``nodeagent status``; unchanged content leaves the file alone."""
        write_atomic(paths.apply_report_file, self.to_json(), mode=0o644)


def detect_flavor(facts: NodeFacts) -> str:
    """eks-al2023 when nodeadm is installed (or its drop-in directory exists) under the root."""
    return "eks-al2023" if facts.nodeadm_present else "generic"


def render_all(config: Config, facts: NodeFacts, flavor: str) -> tuple[list[TargetPlan], list[str]]:
    plans: list[TargetPlan] = []
    errors: list[str] = []
    for render in TARGETS[flavor]:
        name = (render.__module__ or "").rsplit(".", 1)[-1]
        try:
            plans.append(render(config, facts))
        except TargetError as e:
            errors.append(f"{name}: {e}")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")
    return plans, errors


# --- diffs -----------------------------------------------------------------------------------

_HEADER_TABLE = re.compile(r"^\s*\[(host\..*\.)?header\]\s*$")
_TABLE = re.compile(r"^\s*\[")


def redact_headers(text: str) -> str:
    """hosts.toml header values can be tokens: show names only."""
    out, in_header = [], False
    for line in text.splitlines(keepends=True):
        if _TABLE.match(line):
            in_header = bool(_HEADER_TABLE.match(line))
        elif in_header and "=" in line:
            name = line.split("=", 1)[0]
            line = f'{name}= ["<redacted>"]\n'
        out.append(line)
    return "".join(out)


def unified_diff(path: Path, old: bytes | None, new: str | None, *, secret: bool = False) -> str:
    a = "" if old is None else old.decode(errors="replace")
    b = "" if new is None else new
    if secret:
        a, b = redact_headers(a), redact_headers(b)
    lines = difflib.unified_diff(
        a.splitlines(keepends=True),
        b.splitlines(keepends=True),
        fromfile=str(path) if old is not None else "/dev/null",
        tofile=str(path) if new is not None else "/dev/null",
    )
    text = "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines
    )
    return text


def mirrors_header(config: Config, left_out: tuple[str, ...], *, offline: bool) -> str:
    """The dry run's first lines: how mirrors were checked, and each mirror left out and why."""
    cd = config.containerd
    if not cd.mirrors:
        return ""
    if offline:
        how = "--offline: no mirror probed, no credentials fetched"
    elif cd.mirror_health.enabled:
        how = "each mirror probed once now"
    else:
        how = "not probed (containerd.mirrorHealth.enabled: false)"
    if not left_out:
        return f"# mirrors: {how}; none left out of hosts.toml\n"
    lines = [f"# mirrors: {how}; what is left out of the hosts.toml diffs below, and why:"]
    lines += [f"#   {w}" for w in left_out]
    return "\n".join(lines) + "\n"


# --- writing ---------------------------------------------------------------------------------


def _mode_for(f: DesiredFile, current_mode: int | None) -> int:
    # a file we patch keeps its owner's permissions; our own files get the mode we chose
    if not f.owned and current_mode is not None:
        return current_mode
    return f.mode


def remove_stale_temp_files(path: Path) -> None:
    """Temp files ``write_atomic`` left next to ``path`` when a run was killed mid-write."""
    try:
        stale = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return
    for t in stale:
        with contextlib.suppress(OSError):
            t.unlink()


def write_file(f: DesiredFile, report: ApplyReport) -> bool:
    remove_stale_temp_files(f.path)
    data = f.content.encode()
    current = read_bytes_or_none(f.path)
    current_mode = (f.path.stat().st_mode & 0o7777) if current is not None else None
    mode = _mode_for(f, current_mode)
    if current == data and current_mode == mode:
        return False
    if current is not None and not is_owned(current):
        backup = f.path.with_name(f.path.name + BACKUP_SUFFIX)
        if not backup.exists():
            write_atomic(backup, current, mode=current_mode or 0o600)
            report.backups.append(str(backup))
    changed = write_atomic(f.path, data, mode=mode)
    if changed:
        report.changed.append(str(f.path))
    return changed


def remove_file(path: Path, report: ApplyReport) -> None:
    current = read_bytes_or_none(path)
    if current is None or not is_owned(current):
        return  # only ever remove what carries our marker
    if remove_durably(path):
        report.removed.append(str(path))
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # the registry directory, when nothing else is left in it


# (config, paths) -> (config without the mirrors that cannot serve now, one warning per mirror left out);
# commands/apply.py passes nodeagent.mirrorhealth.applycheck.leave_out_dead_mirrors
MirrorCheck = Callable[[Config, Paths], tuple[Config, tuple[str, ...]]]


# --- the runner ------------------------------------------------------------------------------


def run_apply(
    config: Config,
    facts: NodeFacts,
    *,
    flavor: str = "auto",
    dry_run: bool = False,
    out: TextIO | None = None,
    restarter: Restarter | None = None,
    mirror_check: MirrorCheck | None = None,
    offline: bool = False,
) -> ApplyReport:
    out = out or sys.stdout
    if flavor == "auto":
        flavor = detect_flavor(facts)
    if flavor not in TARGETS:
        raise ValueError(f"unknown flavor {flavor!r}")
    report = ApplyReport(flavor=flavor, dry_run=dry_run, snapshotter=config.containerd.snapshotter)
    if config.containerd.snapshotter == "soci":
        report.pull_mode = config.containerd.soci.pull_mode
    for c in resolve(config, facts).choices():
        report.tuning.append({"key": c.key, "value": c.value, "auto": c.auto, "reason": c.reason})
    report.warnings.extend(config_warnings(config))
    report.warnings.extend(missing_mirror_cas(config, facts.paths))
    left_out: tuple[str, ...] = ()
    if mirror_check is not None:  # mirror health (issue 8): a mirror dead right now is not written
        config, left_out = mirror_check(config, facts.paths)
        report.warnings.extend(left_out)

    plans, errors = render_all(config, facts, flavor)
    for p in plans:
        report.warnings.extend(p.warnings)
        report.notes.extend(p.notes)
    if errors:
        report.errors.extend(errors)
        return report  # nothing is written when any target cannot render

    if dry_run:
        out.write(mirrors_header(config, left_out, offline=offline))
        for p in plans:
            for f in p.files:
                current = read_bytes_or_none(f.path)
                if current != f.content.encode():
                    out.write(unified_diff(f.path, current, f.content, secret=f.secret))
                    report.changed.append(str(f.path))
                    _note_change(p, report)
            for path in p.remove:
                out.write(unified_diff(path, read_bytes_or_none(path), None, secret=True))
                report.removed.append(str(path))
        return report

    for p in plans:
        try:
            restart_needed = False
            changed_here = False
            snapshots: dict[Path, tuple[bytes | None, int | None]] = {}
            for f in p.files:
                if p.restart_on_change:
                    cur = read_bytes_or_none(f.path)
                    snapshots[f.path] = (cur, f.path.stat().st_mode & 0o7777 if cur is not None else None)
                if write_file(f, report):
                    changed_here = True
                    _note_change(p, report)
                    restart_needed = p.restart_on_change
            for path in p.remove:
                remove_file(path, report)
            if p.target == "soci" and changed_here and flavor == "generic":
                restart_soci(config, facts, report)
                continue
            skip = restart_skip_reason(config, facts) if restarter is None else None
            if restart_needed and flavor == "generic" and skip:
                report.warnings.append(f"containerd config changed but {skip}: restart containerd to use it")
            elif restart_needed and flavor == "generic":
                for path, (prev, mode) in snapshots.items():
                    restart_with_rollback(config, path, prev, mode, restarter or restart_containerd, report)
        except OSError as e:
            report.errors.append(f"{p.target}: {e.strerror or e}: {e.filename or ''}".rstrip(": "))
    return report


def _note_change(plan: TargetPlan, report: ApplyReport) -> None:
    for n in plan.notes_on_change:
        if n not in report.notes:
            report.notes.append(n)
