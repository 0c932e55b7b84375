"""The ``nodeagent`` command line (contract: ../shared/DESIGN.md "Command line").

Kept import-light: each subcommand lives in ``nodeagent.commands.<name>`` and is imported only when
it runs, so ``nodeagent validate`` on the boot path does not pay for grpc or prometheus_client.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nodeagent import __version__
from nodeagent.util.paths import Paths

DEFAULT_CONFIG = str(Paths().config_file)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_CONFIG = 2
EXIT_INVALID_USAGE = 2  # what argparse exits with for a bad command line


def _common(p: argparse.ArgumentParser, *, config: bool = True, imds: bool = True) -> None:
    if config:
        p.add_argument(
            "-c",
            "--config",
            default=None,
            metavar="FILE",
            help=f"config file (default: {DEFAULT_CONFIG}, under --root)",
        )
    p.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="prefix every host path read or written with DIR (for tests and image builds)",
    )
    if config and imds:
        p.add_argument(
            "--imds",
            choices=["auto", "on", "off"],
            default=None,
            help="merge the config part of the EC2 user-data (IMDSv2) over the file; default "
            "$NODEAGENT_IMDS or auto (on for the eks-al2023 flavor)",
        )
        p.add_argument(
            "--imds-endpoint",
            default=None,
            metavar="URL",
            help="IMDS address (default $NODEAGENT_IMDS_ENDPOINT or http://169.254.169.254)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodeagent",
        description="Kubernetes node agent: faster pod start-up through image pull tuning, "
        "prefetch, a metered CRI image proxy and disk-aware image eviction.",
    )
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "validate",
        help="load and validate the config; print every problem",
        description="Load and validate the config. Every problem is printed once as "
        "'path.to.key: message (line N)'. Exit 0 valid, 2 invalid.",
    )
    _common(p)

    p = sub.add_parser(
        "apply",
        help="write kubelet, containerd and registry-mirror configuration",
        description="Render and write kubelet settings, containerd settings and hosts.toml mirrors. "
        "A second run with the same input writes nothing. Exit 0 ok, 1 failed (nothing half-written), "
        "2 invalid config.",
    )
    _common(p)
    p.add_argument(
        "--flavor",
        choices=["auto", "eks-al2023", "generic"],
        default="auto",
        help="what to write: eks-al2023 a nodeadm NodeConfig drop-in (nodeadm applies it at boot); "
        "generic a kubelet --config-dir drop-in and containerd's config.toml (then restarts "
        "containerd); auto (default) eks-al2023 where nodeadm is installed, else generic",
    )
    p.add_argument("--dry-run", action="store_true", help="print a unified diff per file, write nothing")
    p.add_argument(
        "--offline",
        action="store_true",
        help="probe no mirror and fetch no mirror credentials (AMI builds, reviews): every mirror "
        "without credentials is written; the ones with credentials are left out (nodeagent run adds "
        "them once it has them)",
    )

    p = sub.add_parser(
        "prefetch",
        help="pull images.prefetch through CRI before the kubelet starts",
        description="Pull images.prefetch through CRI in parallel, with progress. Exit 0 when every "
        "required image is present, 1 otherwise.",
    )
    _common(p)
    p.add_argument("--bake", action="store_true", help="AMI build: also pin images and write the manifest")

    p = sub.add_parser(
        "run",
        help="the daemon: CRI image proxy, eviction loop, metrics endpoint",
        description="Run the daemon until SIGTERM (then drain and exit 0).",
    )
    _common(p)

    p = sub.add_parser(
        "evict",
        help="show what the eviction policy would remove now, and why",
        description="Print the eviction plan as a table. Only --dry-run is supported from the command "
        "line; the daemon does the removing.",
    )
    _common(p)
    # not required=True: without it the command says why only --dry-run exists (commands/evict.py)
    p.add_argument("--dry-run", action="store_true", help="print the plan, remove nothing (required)")

    p = sub.add_parser(
        "status",
        help="cache size, imagefs usage, recent pulls, evictions, mirror health",
        description="Operator view of this node, from the daemon's status file and the last apply "
        "report (no config is read). Exit 0 healthy, 1 degraded.",
    )
    _common(p, config=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "userdata",
        help="render launch-template user-data carrying this node's settings",
        description="Render EC2 user-data (AL2023 nodeadm MIME multi-part) or a Karpenter EC2NodeClass.",
    )
    _common(p, imds=False)
    p.add_argument("--format", choices=["al2023", "karpenter"], required=True)
    g = p.add_argument_group("cluster details (al2023: adds a nodeadm NodeConfig part; give all four)")
    g.add_argument("--cluster-name", metavar="NAME")
    g.add_argument("--api-server-endpoint", metavar="URL", help="https:// endpoint of the cluster")
    g.add_argument("--certificate-authority", metavar="BASE64", help="CA data from describe-cluster")
    g.add_argument("--cidr", metavar="CIDR", help="the cluster's service CIDR, e.g. 10.100.0.0/16")
    g = p.add_argument_group("karpenter")
    g.add_argument("--name", default="nodeagent", help="EC2NodeClass and NodePool name (default nodeagent)")
    g.add_argument(
        "--ami-tag",
        default="nodeagent.io/baked=true",
        metavar="KEY=VALUE",
        help="tag that selects the baked AMI (default nodeagent.io/baked=true)",
    )
    g.add_argument(
        "--startup-taint",
        action="store_true",
        help="opt in: the NodePool gets the startup taint nodeagent.io/images-not-ready:NoSchedule and the "
        "output adds nodeagent taint-remover (ServiceAccount, ClusterRole, ClusterRoleBinding, Deployment) "
        "that removes it once the node reports nodeagent.io/ImagesReady=True; needs --remover-image",
    )
    g.add_argument(
        "--remover-image",
        metavar="IMAGE",
        help="container image holding the nodeagent package, for the taint remover's Deployment",
    )
    g.add_argument(
        "--remover-max-wait",
        default="15m",
        metavar="DURATION",
        help="the remover lifts the taint anyway this long after a Node registered (default 15m; 0 = never)",
    )

    p = sub.add_parser(
        "taint-remover",
        help="cluster controller: remove the opt-in startup taint once a node reports its images ready",
        description="Watch every Node and remove the startup taint nodeagent.io/images-not-ready from a "
        "Node whose condition nodeagent.io/ImagesReady is True (or --max-wait after it registered). "
        "Runs in the cluster as a Deployment with its own service account (nodes: list, watch, patch); "
        "`nodeagent userdata --format karpenter --startup-taint` renders it. Exit 0 after SIGTERM, "
        "1 when it cannot start.",
    )
    p.add_argument(
        "--kubeconfig",
        metavar="FILE",
        default=None,
        help="kubeconfig to use (default: the pod's service account, in-cluster)",
    )
    p.add_argument(
        "--max-wait",
        default="15m",
        metavar="DURATION",
        help="remove the taint anyway this long after the Node was created (default 15m; 0 = never)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command
    try:
        module = importlib.import_module(f"nodeagent.commands.{name.replace('-', '_')}")
    except ModuleNotFoundError as e:
        if e.name != f"nodeagent.commands.{name.replace('-', '_')}":
            raise
        print(f"nodeagent {name}: not implemented yet", file=sys.stderr)
        return EXIT_FAILED
    rc: int = module.run(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
