"""``nodeagent run [-c FILE] [--root DIR]``: the daemon (CRI image proxy, metrics, workers).

Exit 0 after SIGTERM (in-flight calls drained), 2 invalid config, 1 when it cannot start (e.g.
the proxy socket is held by another live process, or systemd passed a socket the proxy cannot
serve: ``sd_daemon.ListenFdsError``). Under systemd the proxy socket comes from nodeagent.socket
(``LISTEN_FDS``); started by hand, the daemon binds ``cri.proxySocket`` itself. Features plug into
the daemon in ``build_daemon``: each adds its workers, pull listeners and status sections there.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from nodeagent.cli import EXIT_FAILED, EXIT_INVALID_CONFIG
from nodeagent.commands.loadconfig import load
from nodeagent.config import Config
from nodeagent.util.paths import Paths

if TYPE_CHECKING:
    from nodeagent.run.daemon import Daemon


def build_daemon(config: Config, paths: Paths) -> Daemon:
    from nodeagent.run.daemon import Daemon

    daemon = Daemon(config, paths)
    # --- features plug in here (one block each) -------------------------------------------------
    # mirror health (issue 8): probe mirrors, take a dead one out of hosts.toml, restart pulls stuck
    # on it (nodeagent/mirrorhealth)
    from nodeagent.mirrorhealth.monitor import from_config as mirror_health

    mirrors = mirror_health(config, paths, daemon.metrics, on_change=daemon.mark_status_dirty)
    if mirrors is not None:
        daemon.add_worker("mirrorhealth", mirrors.run)
        daemon.set_pull_wrapper(mirrors.run_with_failover)
        daemon.add_status_hook("mirrorHealth", mirrors.status)
    evictor = None
    if config.eviction.enabled:  # disk-aware image eviction (issue 5)
        from nodeagent.eviction.loop import EvictionLoop

        evictor = EvictionLoop(config, paths, daemon.metrics, daemon.last_used, cache=daemon.cache)
        daemon.add_worker("eviction", evictor.run)
        daemon.add_pull_listener(evictor.on_pull)
        daemon.add_status_hook("eviction", evictor.status)
    if config.pod_pulls.enabled:  # pod-aware pulls (issue 14): nodeagent/podpulls
        from nodeagent.podpulls import PodPulls

        pod_pulls = PodPulls(config, paths, daemon, evictor)
        daemon.add_worker("podpulls", pod_pulls.run)
        daemon.add_status_hook("podPulls", pod_pulls.status)
    if config.images.ready_condition:  # the Node condition the opt-in startup taint waits for (issue 15)
        from nodeagent.images.readiness import ImagesReady

        ready = ImagesReady(config, paths, daemon)
        daemon.add_worker("imagesready", ready.run)
        daemon.add_status_hook("imagesReady", ready.status)
    return daemon


def run(args: argparse.Namespace) -> int:
    from nodeagent.util import log

    log.setup()
    paths = Paths.at(args.root)
    loaded = load(args, paths, notes=True)  # baked file + user-data part (IMDS), docs/eks.md
    if loaded is None:
        return EXIT_INVALID_CONFIG
    config = loaded.config
    from nodeagent.proxy.sockets import SocketInUseError

    daemon = build_daemon(config, paths)
    try:
        return asyncio.run(daemon.run())
    except (SocketInUseError, OSError, ValueError) as e:
        print(f"nodeagent run: {e}", file=sys.stderr)
        return EXIT_FAILED
