"""``nodeagent apply``: write kubelet, containerd and registry-mirror configuration.

Exit 0 ok, 1 failed (every file is old or new, never half-written), 2 invalid config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nodeagent.apply.facts import gather
from nodeagent.apply.runner import MirrorCheck, run_apply
from nodeagent.cli import EXIT_FAILED, EXIT_INVALID_CONFIG, EXIT_OK
from nodeagent.commands.loadconfig import load
from nodeagent.config.model import Config, Mirror
from nodeagent.util.paths import Paths

OFFLINE = "--offline: not fetched"


def offline_mirrors(config: Config, paths: Paths) -> tuple[Config, tuple[str, ...]]:
    """apply's mirror step without the network: no probe, no credential fetch (a mirror with
    credentials is left out as when they are unavailable, so nothing secret lands in an image)."""
    from nodeagent.images.credentials import CredentialError
    from nodeagent.mirrorhealth.applycheck import prepare_mirrors

    def no_fetch(m: Mirror) -> str:
        raise CredentialError(OFFLINE)

    cd = config.containerd
    quiet = dataclasses.replace(cd, mirror_health=dataclasses.replace(cd.mirror_health, enabled=False))
    new, left_out = prepare_mirrors(dataclasses.replace(config, containerd=quiet), paths, fetch=no_fetch)
    kept = dataclasses.replace(new.containerd, mirror_health=cd.mirror_health)
    return dataclasses.replace(new, containerd=kept), left_out


def run(args: argparse.Namespace) -> int:
    paths = Paths.at(args.root)
    loaded = load(args, paths)  # baked file + user-data part (IMDS), docs/eks.md
    if loaded is None:
        return EXIT_INVALID_CONFIG
    config = loaded.config
    facts = gather(paths, config.containerd.hosts_dir, user_data=loaded.user_data)
    mirror_check: MirrorCheck | None = None
    if config.containerd.mirrors:
        # imported only when there are mirrors (asyncio, ssl): apply is on the boot path.
        # Resolves mirror credentials, and with mirror health on, leaves out the dead mirrors.
        from nodeagent.mirrorhealth.applycheck import prepare_mirrors

        mirror_check = offline_mirrors if args.offline else prepare_mirrors

    report = run_apply(
        config,
        facts,
        flavor=args.flavor,
        dry_run=args.dry_run,
        mirror_check=mirror_check,
        offline=args.offline,
    )
    # bad user-data: the baked config has been applied above; exit 1 and keep the error for `status`
    report.warnings.extend(loaded.warnings)
    if loaded.userdata_error:
        report.errors.append(loaded.userdata_error)

    prefix = "would change" if args.dry_run else "changed"
    print(f"flavor: {report.flavor}")
    for t in report.tuning:
        how = f"auto: {t['reason']}" if t["auto"] else "from config"
        print(f"tuning: {t['key']} = {t['value']} ({how})")
    for n in report.notes:
        print(f"note: {n}")
    for f in report.backups:
        print(f"backup: {f}")
    for f in report.changed:
        print(f"{prefix}: {f}")
    for f in report.removed:
        print(f"{'would remove' if args.dry_run else 'removed'}: {f}")
    if report.containerd_restarted:
        print("containerd: restarted, CRI answers")
    if not report.changed and not report.removed and report.ok:
        print("nothing to change")
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for problem in report.errors:
        print(f"error: {problem}", file=sys.stderr)
    if not args.dry_run:
        try:
            report.write(paths)
        except OSError as e:
            print(f"error: cannot write {paths.apply_report_file}: {e.strerror}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK if report.ok else EXIT_FAILED
