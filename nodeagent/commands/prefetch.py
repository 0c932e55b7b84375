"""``nodeagent prefetch [-c FILE] [--root DIR] [--bake]``: pull ``images.prefetch`` through CRI.

Exit 0 when every ``required`` image is present at the end, 1 otherwise (also when ``--bake`` could
not pin an image or write the manifest), 2 when the config is invalid. A live per-image view on a
terminal; one line per event otherwise (Packer, journald). A summary table at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from nodeagent.cli import EXIT_FAILED, EXIT_INVALID_CONFIG
from nodeagent.commands.loadconfig import load
from nodeagent.util.paths import Paths


def run(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    from nodeagent.images.credentials import PROVIDER_TIMEOUT, CredentialError, Credentials, DockerConfig
    from nodeagent.images.prefetch import Prefetcher
    from nodeagent.images.prefetch_output import LineProgress, TtyProgress, format_summary

    out = stdout or sys.stdout
    paths = Paths.at(args.root)
    loaded = load(args, paths, notes=True)  # baked file + user-data part (IMDS), docs/eks.md
    if loaded is None:
        return EXIT_INVALID_CONFIG
    cfg = loaded.config
    images = cfg.images

    try:
        credentials = Credentials.from_config(
            paths, images, timeout=min(PROVIDER_TIMEOUT, images.prefetch_budget)
        )
    except CredentialError as e:
        # A broken credential setup must not stop public images from being pulled.
        print(f"nodeagent prefetch: warning: {e}; credential provider plugins not used", file=sys.stderr)
        try:
            credentials = Credentials(None, DockerConfig.from_file(paths.host(images.docker_config)))
        except CredentialError as e2:
            print(f"nodeagent prefetch: warning: {e2}; docker config not used", file=sys.stderr)
            credentials = Credentials(None, None)

    warnings: list[str] = []
    to_pull = images.prefetch
    if args.bake:
        from nodeagent.images.bake import snapshotter_warnings, with_sandbox_image

        to_pull, warnings = with_sandbox_image(images.prefetch, paths)  # the node's real pause image
        warnings += snapshotter_warnings(cfg, paths)
        for w in warnings:
            print(f"nodeagent prefetch: warning: {w}", file=sys.stderr)

    progress = TtyProgress(out) if out.isatty() else LineProgress(out)

    async def main() -> tuple[int, list[str]]:
        from nodeagent.cri.client import CriClient

        async with CriClient(cfg.cri.endpoint, timeout=cfg.cri.timeout, pull_timeout=None) as cri:
            report = await Prefetcher(
                cri,
                to_pull,
                concurrency=images.prefetch_concurrency,
                budget=images.prefetch_budget,
                credentials=credentials,
                progress=progress,
            ).run()
        print(format_summary(report), file=out)
        rc = report.exit_code
        errors: list[str] = []
        if args.bake:
            from nodeagent.cri.containerd_images import ContainerdImages
            from nodeagent.images.bake import pin_and_record

            async with ContainerdImages(cfg.cri.endpoint, timeout=cfg.cri.timeout) as api:
                result = await pin_and_record(report.outcomes, api, paths)
            errors = result.errors
            pinned = sum(1 for b in result.images if b.pinned)
            print(
                f"bake: {len(result.images)} image(s) in {paths.baked_manifest}"
                f" ({pinned} pinned){'' if result.changed else ', unchanged'}",
                file=out,
            )
            if errors:
                rc = EXIT_FAILED
        return rc, errors

    try:
        rc, errors = asyncio.run(main())
    except OSError as e:
        print(f"nodeagent prefetch: {e}", file=sys.stderr)
        return EXIT_FAILED
    for err in errors:
        print(f"nodeagent prefetch: bake: {err}", file=sys.stderr)
    if loaded.userdata_error:  # reported above; the baked config's images were pulled
        rc = EXIT_FAILED
    return rc
