"""``nodeagent apply``'s one-shot mirror preparation: credentials in, dead mirrors out.

1. Every mirror with ``credentials`` gets them now (a provider plugin run, a docker config or a
   file; ``nodeagent.mirrorhealth.auth``) as the ``Authorization`` header of its own ``[host]``
   section. A mirror whose credentials cannot be had is left out, with a warning that never holds a
   secret: written without them it would answer 401 and containerd would skip it silently.
2. Every mirror is probed once, all in parallel, bounded by ``containerd.mirrorHealth.timeout``
   (stdlib only: no grpc, no prometheus_client on the boot path), with its credentials. The ones
   that do not answer, or refuse the credentials, are left out with one warning each; ``nodeagent
   run`` puts a mirror back once it answers ``successesBeforeUp`` probes in a row (an in-cluster
   mirror such as Spegel is never up before the kubelet, so this is the normal path for it).
   With ``mirrorHealth.enabled: false`` nothing is probed.
3. A mirror-only registry always keeps at least one mirror: when none is usable, all its mirrors
   are written anyway (its pulls fail until one is), with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from nodeagent.config.model import Config, Mirror
from nodeagent.images.credentials import CredentialError
from nodeagent.mirrorhealth import auth
from nodeagent.mirrorhealth.monitor import ca_resolver, display_endpoint
from nodeagent.mirrorhealth.probe import ProbeResult, ProbeTarget, make_target, probe_all_once
from nodeagent.util.paths import Paths, UnsafePathError

Fetch = Callable[[Mirror], str]  # the Authorization value of a mirror with credentials


def _fetcher(config: Config, paths: Paths) -> Fetch:
    def fetch(m: Mirror) -> str:
        source = auth.source_for(config, paths, m)
        assert source is not None
        return source.fetch().header

    return fetch


def prepare_mirrors(
    config: Config,
    paths: Paths,
    *,
    probe_all: Callable[[list[ProbeTarget], float], list[ProbeResult]] | None = None,
    fetch: Fetch | None = None,
) -> tuple[Config, tuple[str, ...]]:
    """``config`` with credentials resolved and without the mirrors that cannot serve now, and a
    warning per mirror left out. ``probe_all`` and ``fetch`` stand in for the real ones in tests."""
    cd = config.containerd
    if not any(ms for _, ms in cd.mirrors):
        return config, ()
    get = fetch if fetch is not None else _fetcher(config, paths)
    warnings: list[str] = []
    # registry -> [(index, mirror with credentials resolved, usable so far)]
    table: dict[str, list[tuple[int, Mirror, bool]]] = {}
    for registry, mirrors in cd.mirrors:
        rows = table.setdefault(registry, [])
        for i, m in enumerate(mirrors):
            if m.credentials is None:
                rows.append((i, m, True))
                continue
            try:
                rows.append((i, auth.with_authorization(m, get(m)), True))
            except CredentialError as e:
                warnings.append(
                    f"containerd.mirrors.{registry}[{i}]: {display_endpoint(m.endpoint)}: credentials "
                    f"unavailable ({e}); left out of hosts.toml until nodeagent run gets them"
                )
                rows.append((i, m, False))
    if cd.mirror_health.enabled:
        resolve = ca_resolver(paths, cd.hosts_dir)
        items: list[tuple[str, int, Mirror, ProbeTarget]] = []
        for registry, rows in table.items():
            for i, m, ok in rows:
                if not ok:
                    continue
                try:
                    target = make_target(registry, m, functools.partial(resolve, registry))
                except UnsafePathError:
                    continue  # an unsafe registry name: apply's own check reports it
                items.append((registry, i, m, target))
        run = probe_all if probe_all is not None else probe_all_once
        results = run([t for *_, t in items], cd.mirror_health.timeout)
        dead: set[tuple[str, int]] = set()
        for (registry, i, m, _), r in zip(items, results, strict=True):
            if r.alive:
                continue
            dead.add((registry, i))
            what = "refuses its credentials" if r.auth_ok is False else "not answering"
            warnings.append(
                f"containerd.mirrors.{registry}[{i}]: {display_endpoint(m.endpoint)} {what} at apply time "
                f"({r.error}); left out of hosts.toml until it answers (nodeagent run puts it back)"
            )
        for registry, rows in table.items():
            table[registry] = [(i, m, ok and (registry, i) not in dead) for i, m, ok in rows]
    out: list[tuple[str, tuple[Mirror, ...]]] = []
    for registry, rows in table.items():
        usable = tuple(m for _, m, ok in rows if ok)
        if not usable and rows and cd.is_mirror_only(registry):
            usable = tuple(m for _, m, _ in rows)
            warnings.append(
                f"containerd.mirrors.{registry}: mirror-only and no mirror is usable now: all are written "
                f"anyway (never the registry itself); pulls from {registry} fail until one is"
            )
        out.append((registry, usable))
    new = dataclasses.replace(config, containerd=dataclasses.replace(cd, mirrors=tuple(out)))
    if new == config:
        return config, tuple(warnings)
    return new, tuple(warnings)


# the name apply used before credentials existed
leave_out_dead_mirrors = prepare_mirrors
