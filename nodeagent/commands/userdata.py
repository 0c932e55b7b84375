"""``nodeagent userdata``: print launch-template user-data (or a Karpenter EC2NodeClass) carrying the config.

The nodeagent part is the config file's text, byte for byte, after it validated: what a node reads
back from IMDS is exactly what was reviewed.
"""

from __future__ import annotations

import argparse
import sys

from nodeagent.cli import EXIT_INVALID_CONFIG, EXIT_OK
from nodeagent.commands.loadconfig import load
from nodeagent.eks import karpenter, userdata
from nodeagent.util.durations import parse_duration
from nodeagent.util.paths import Paths


def _cluster(args: argparse.Namespace) -> tuple[userdata.ClusterDetails | None, list[str]]:
    values = {
        "--cluster-name": args.cluster_name,
        "--api-server-endpoint": args.api_server_endpoint,
        "--certificate-authority": args.certificate_authority,
        "--cidr": args.cidr,
    }
    given = [k for k, v in values.items() if v]
    if not given:
        return None, []
    missing = [k for k, v in values.items() if not v]
    if missing:
        return None, [f"{k}: required with {', '.join(given)} (nodeadm needs all four)" for k in missing]
    c = userdata.ClusterDetails(
        name=args.cluster_name,
        api_server_endpoint=args.api_server_endpoint,
        certificate_authority=args.certificate_authority,
        cidr=args.cidr,
    )
    return c, c.problems()


def _karpenter_problems(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    key, sep, value = args.ami_tag.partition("=")
    if not sep or not key or not value:
        out.append(f"--ami-tag: {args.ami_tag!r} must be KEY=VALUE")
    if args.startup_taint and not args.remover_image:
        out.append(
            "--startup-taint: needs --remover-image IMAGE (an image holding the nodeagent package): a "
            "startup taint is rendered only together with the remover that lifts it"
        )
    if args.remover_image and not args.startup_taint:
        out.append("--remover-image: only with --startup-taint")
    if parse_duration(args.remover_max_wait) is None or args.remover_max_wait.startswith("-"):
        out.append(f"--remover-max-wait: {args.remover_max_wait!r} is not a duration such as 15m or 0")
    return out


def run(args: argparse.Namespace) -> int:
    # the file alone: this machine's own user-data must not leak into what it publishes
    loaded = load(args, Paths.at(args.root), use_imds=False)
    if loaded is None:
        return EXIT_INVALID_CONFIG
    text = loaded.text

    try:
        # the part carries the settings, not the file's comments (EC2 caps user-data at 16 KiB)
        text = userdata.compact_config(text)
        if args.format == "al2023":
            cluster, problems = _cluster(args)
            if problems:
                for msg in problems:
                    print(msg, file=sys.stderr)
                return EXIT_INVALID_CONFIG
            out = userdata.render_al2023(text, cluster)
        else:
            problems = _karpenter_problems(args)
            if problems:
                for msg in problems:
                    print(msg, file=sys.stderr)
                return EXIT_INVALID_CONFIG
            key, _, value = args.ami_tag.partition("=")
            out = karpenter.render_karpenter(
                text,
                name=args.name,
                cluster_name=args.cluster_name or "${CLUSTER_NAME}",
                ami_tag=(key, value),
                remover_image=args.remover_image if args.startup_taint else None,
                max_wait=args.remover_max_wait,
            )
    except userdata.UserDataError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID_CONFIG
    document = out if args.format == "al2023" else karpenter.karpenter_user_data(out)
    size, problem = userdata.size_report(document)
    if problem is not None and size > userdata.EC2_USERDATA_LIMIT:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    sys.stdout.write(out)
    print(f"user-data: {size} bytes (EC2 limit {userdata.EC2_USERDATA_LIMIT})", file=sys.stderr)
    if problem is not None:
        print(f"warning: {problem}", file=sys.stderr)
    return EXIT_OK
