"""``nodeagent apply``'s one-shot mirror check: a mirror that is dead at boot is not written.

Every configured mirror is probed once, all in parallel, bounded by
``containerd.mirrorHealth.timeout`` (stdlib only: no grpc, no prometheus_client on the boot path).
The ones that do not answer are left out of the config that ``apply`` renders, with one warning
each; ``nodeagent run`` puts a mirror back once it answers ``successesBeforeUp`` probes in a row
(an in-cluster mirror such as Spegel is never up before the kubelet, so this is the normal path
for it). With ``mirrorHealth.enabled: false`` nothing is probed and every mirror is written.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from nodeagent.config.model import Config, Mirror
from nodeagent.mirrorhealth.monitor import ca_resolver, display_endpoint
from nodeagent.mirrorhealth.probe import ProbeResult, ProbeTarget, make_target, probe_all_once
from nodeagent.paths import Paths, UnsafePathError


def leave_out_dead_mirrors(
    config: Config,
    paths: Paths,
    *,
    probe_all: Callable[[list[ProbeTarget], float], list[ProbeResult]] | None = None,
) -> tuple[Config, tuple[str, ...]]:
    """``config`` without the mirrors that do not answer now, and a warning per mirror left out.
    ``probe_all`` stands in for ``probe_all_once`` in tests."""
    cd = config.containerd
    if not cd.mirror_health.enabled or not any(ms for _, ms in cd.mirrors):
        return config, ()
    resolve = ca_resolver(paths, cd.hosts_dir)
    items: list[tuple[str, int, Mirror, ProbeTarget]] = []
    for registry, mirrors in cd.mirrors:
        for i, m in enumerate(mirrors):
            try:
                target = make_target(registry, m, functools.partial(resolve, registry))
            except UnsafePathError:
                continue  # an unsafe registry name: apply's own check reports it
            items.append((registry, i, m, target))
    run = probe_all if probe_all is not None else probe_all_once
    results = run([t for *_, t in items], cd.mirror_health.timeout)
    dead = {(registry, i) for (registry, i, _, _), r in zip(items, results, strict=True) if not r.alive}
    warnings = tuple(
        f"containerd.mirrors.{registry}[{i}]: {display_endpoint(m.endpoint)} not answering at apply time "
        f"({r.error}); left out of hosts.toml until it answers (nodeagent run puts it back)"
        for (registry, i, m, _), r in zip(items, results, strict=True)
        if not r.alive
    )
    if not dead:
        return config, ()
    alive = tuple(
        (registry, tuple(m for i, m in enumerate(ms) if (registry, i) not in dead))
        for registry, ms in cd.mirrors
    )
    return dataclasses.replace(config, containerd=dataclasses.replace(cd, mirrors=alive)), warnings
