"""``nodeagent taint-remover [--kubeconfig FILE] [--max-wait DURATION]``: the cluster-side half of the
opt-in startup taint (``nodeagent/eks/taintremover.py``; docs/eks.md, "Image readiness").

In the cluster it authenticates with its pod's service account (``/var/run/secrets/kubernetes.io/
serviceaccount``); ``--kubeconfig`` is for running it elsewhere (and for the tests). Logs are JSON
lines on stdout. Exit 0 after SIGTERM/SIGINT, 1 when it cannot start (no usable credentials, a bad
``--max-wait``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from nodeagent.cli import EXIT_FAILED, EXIT_OK
from nodeagent.util.durations import parse_duration


def _client(kubeconfig: str | None) -> Any:
    import httpx2
    from lightkube import AsyncClient, ConfigError, KubeConfig

    from nodeagent.podpulls.kube import REQUEST_TIMEOUT, KubeconfigError, load_client

    if kubeconfig:
        try:
            return load_client(Path(kubeconfig))
        except KubeconfigError as e:
            raise SystemExit(f"nodeagent taint-remover: {e}") from None
    try:
        config = KubeConfig.from_service_account()
    except (ConfigError, OSError) as e:
        raise SystemExit(
            "nodeagent taint-remover: no service account credentials in this pod "
            f"({' '.join(str(e).split())[:200]}); outside the cluster give --kubeconfig"
        ) from None
    return AsyncClient(config=config, timeout=httpx2.Timeout(REQUEST_TIMEOUT), trust_env=False)


async def _main(kubeconfig: str | None, max_wait: float) -> None:
    from nodeagent.eks.taintremover import TaintRemover
    from nodeagent.util.log import event, get_logger

    log = get_logger("nodeagent.eks.taintremover")
    client = _client(kubeconfig)
    remover = TaintRemover(client, max_wait=max_wait)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if task is not None:
            loop.add_signal_handler(sig, task.cancel)
    event(log, "taint remover started", max_wait=max_wait, kubeconfig=kubeconfig or "(service account)")
    try:
        await remover.run()
    except asyncio.CancelledError:
        event(log, "taint remover stopping", removed=remover.removed, errors=remover.errors)
    finally:
        await client.close()


def run(args: argparse.Namespace) -> int:
    from nodeagent.util import log

    max_wait = parse_duration(args.max_wait)
    if max_wait is None or max_wait < 0:
        print(f"--max-wait: {args.max_wait!r} is not a duration such as 15m or 0", file=sys.stderr)
        return EXIT_FAILED
    log.setup()
    try:
        asyncio.run(_main(args.kubeconfig, max_wait))
    except SystemExit as e:
        print(str(e.code), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
