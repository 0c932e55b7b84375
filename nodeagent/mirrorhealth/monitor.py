"""The mirror health worker of ``nodeagent run``: probe, decide, rewrite hosts.toml, wake stuck pulls.

One probe loop per (registry, mirror) on ``interval`` with jitter (first probe at once, so a node
that boots with a dead mirror loses it within a few seconds). Each outcome feeds that mirror's
``MirrorState``; on a transition the registry's hosts.toml is rewritten with exactly the mirrors
that are up, in configured order (``HostsWriter``), the metrics and the status change, and, on a
*down* transition that rewrote the file, every pull of that registry that is waiting in
``run_with_failover`` is cancelled upstream and retried once (containerd reads hosts.toml per pull,
so the retry no longer tries the dead mirror).

Clock, sleep, randomness and the probe are injectable, so tests drive it without real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from nodeagent.config.model import Config, Mirror, MirrorHealthConfig
from nodeagent.images.credentials import CredentialError, MirrorCredentialSource
from nodeagent.mirrorhealth import probe as probes
from nodeagent.mirrorhealth.state import Health, MirrorState, Thresholds
from nodeagent.mirrorhealth.stuckpulls import StuckPulls
from nodeagent.mirrorhealth.watched import HostsWriter, WatchedMirror
from nodeagent.util.log import event, get_logger
from nodeagent.util.paths import Paths, child
from nodeagent.util.throttle import LOG_PERIOD, PeriodicLog

if TYPE_CHECKING:
    from nodeagent.run.metrics import Metrics

log = get_logger(__name__)
T = TypeVar("T")


def normalize_endpoint(endpoint: str) -> str:
    return endpoint.rstrip("/")


def display_endpoint(endpoint: str) -> str:
    """The endpoint with any ``user:password@`` removed (it never reaches a label or a log)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "", endpoint
    netloc, slash, path = rest.partition("/")
    netloc = netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{path.partition('?')[0]}"


Prober = Callable[[probes.ProbeTarget, float], Awaitable[probes.ProbeResult]]


class MirrorHealth:
    def __init__(
        self,
        mirrors: Sequence[tuple[str, Sequence[Mirror]]],
        settings: MirrorHealthConfig,
        writer: HostsWriter | None,
        metrics: Metrics | None = None,
        *,
        resolve_ca: Callable[[str, str], Path] | None = None,
        on_change: Callable[[], None] | None = None,
        prober: Prober | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        mirror_only: frozenset[str] = frozenset(),
        source_for: Callable[[Mirror], MirrorCredentialSource | None] | None = None,
        log_period: float = LOG_PERIOD,
    ) -> None:
        self.settings = settings
        self.mirror_only = mirror_only
        self.writer = writer
        self.metrics = metrics
        self._prober: Prober = prober or probes.probe
        self._on_change = on_change  # the daemon's "status changed" signal
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - scheduling jitter only
        self._thresholds = Thresholds(
            settings.failures_before_down, settings.successes_before_up, settings.hold_time
        )
        self._mirrors: list[WatchedMirror] = []
        self._registries: dict[str, list[WatchedMirror]] = {}
        self._write_failed: set[str] = set()
        # a problem that persists (a mirror down, hosts.toml not writable, credentials unavailable)
        # is logged when it starts, once per period while it lasts, and when it clears
        self.problems = PeriodicLog(log_period, clock, log)
        for registry, lst in mirrors:
            for m in lst:
                if resolve_ca is not None:
                    reg = registry

                    def ca(path: str, reg: str = reg) -> Path:
                        return resolve_ca(reg, path)

                    make = functools.partial(probes.make_target, registry, resolve_ca=ca)
                else:
                    make = functools.partial(probes.make_target, registry)
                entry = WatchedMirror(
                    registry, m, make(m), MirrorState(self._thresholds), display_endpoint(m.endpoint)
                )
                entry.make = make
                entry.source = source_for(m) if source_for is not None else None
                self._mirrors.append(entry)
                self._registries.setdefault(registry, []).append(entry)
        self._load_initial_state()
        self.pulls = StuckPulls(self._registries, mirror_only)

    # --- state from disk --------------------------------------------------------------------
    def _load_initial_state(self) -> None:
        """A mirror that ``apply`` left out of an owned hosts.toml (dead at boot) starts down."""
        for registry, entries in self._registries.items():
            listed = None
            if self.writer is not None:
                try:
                    listed = self.writer.endpoints_in_file(registry)
                except (OSError, ValueError) as err:
                    event(log, "cannot read hosts.toml", logging.WARNING, registry=registry, error=str(err))
            for e in entries:
                e.in_file = listed is None or normalize_endpoint(e.mirror.endpoint) in listed
                if not e.in_file:
                    e.state.health = Health.DOWN
                self._set_up_metric(e)

    def _set_up_metric(self, e: WatchedMirror) -> None:
        if self.metrics is not None:
            self.metrics.mirror_up.labels(e.registry, e.label).set(1 if e.state.health is Health.UP else 0)

    def _set_auth_metric(self, e: WatchedMirror, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.mirror_auth_ok.labels(e.registry, e.label).set(1 if ok else 0)

    # --- credentials ----------------------------------------------------------------------------
    async def refresh_credentials(self, e: WatchedMirror, *, rewrite: bool = True) -> None:
        """Fetch the mirror's credentials when due (half their lifetime, or the file changed). A
        new value is written into hosts.toml at once, atomically; containerd reads the file per
        pull, and the old value stays valid for the other half of its lifetime, so no pull fails
        at rotation. A failed fetch keeps the current value until it expires."""
        if e.source is None:
            return
        now = self._clock()
        if not e.source.refresh_due(e.auth, now):
            return
        try:
            new = await asyncio.to_thread(e.source.fetch)
        except CredentialError as err:
            msg = str(err)
            self.problems.problem(
                f"credentials:{e.registry}:{e.label}",
                "mirror credentials unavailable",
                msg,
                logging.WARNING,
                registry=e.registry,
                mirror=e.label,
                source=e.source.describe(),
            )
            e.auth_error = msg
            expires = e.auth.expires() if e.auth is not None else None
            if e.auth is not None and expires is not None and now >= expires:
                e.auth = None  # expired: nothing usable is left to write
            return
        e.auth_error = ""
        self.problems.clear(
            f"credentials:{e.registry}:{e.label}",
            "mirror credentials available again",
            registry=e.registry,
            mirror=e.label,
        )
        changed = e.auth is None or e.auth.header != new.header
        e.auth, e.auth_wall = new, self._wall()
        if not changed:
            return
        e.auth_refreshes += 1
        assert e.make is not None
        e.target = e.make(e.written())
        rewritten = False
        if rewrite and (e.in_file or e.state.health is Health.UP):
            rewritten = self._rewrite(e.registry)
        event(
            log,
            "mirror credentials refreshed",
            registry=e.registry,
            mirror=e.label,
            source=new.source,
            lifetime=new.lifetime,
            hosts_toml="rewritten" if rewritten else "unchanged",
        )

    # --- probing ------------------------------------------------------------------------------
    async def probe_once(self, e: WatchedMirror) -> Health | None:
        """Probe one mirror, feed its state; on a transition rewrite hosts.toml. Returns the new health
        on a transition."""
        await self.refresh_credentials(e)
        if e.writable():
            result = await self._prober(e.target, self.settings.timeout)
        else:
            result = probes.ProbeResult(False, 0.0, None, f"credentials unavailable: {e.auth_error}", False)
        self._set_auth_metric(e, result.auth_ok is not False)
        now = self._clock()
        e.last, e.last_probe_wall = result, self._wall()
        if self.metrics is not None:
            self.metrics.mirror_probe_duration.labels(e.registry, e.label).observe(result.duration)
        if not result.alive and e.state.health is Health.UP and e.state.failures == 0:
            event(
                log,
                "mirror probe failed",
                logging.INFO,
                registry=e.registry,
                mirror=e.label,
                error=result.error,
            )
        new = e.state.observe(result.alive, now) if e.writable() else e.state.force_down(now)
        down_key = f"down:{e.registry}:{e.label}"
        if new is None and e.state.health is Health.DOWN and not result.alive:
            # still down: said again once per period, with for how long (the transition said it first)
            self.problems.problem(
                down_key, "mirror down", result.error, logging.WARNING, registry=e.registry, mirror=e.label
            )
        if new is None:
            # retry a write that failed earlier; pulls waiting on this registry go again once it lands
            if (
                e.registry in self._write_failed
                and self._rewrite(e.registry)
                and any(x.state.health is Health.DOWN for x in self._registries[e.registry])
            ):
                self.pulls.wake(e.registry)
            return None
        e.last_change_wall = self._wall()
        changed = self._rewrite(e.registry)
        self._set_up_metric(e)
        if self.metrics is not None and changed:
            self.metrics.mirror_failovers.labels(e.registry, e.label, new.value).inc()
        fields: dict[str, Any] = {
            "registry": e.registry,
            "mirror": e.label,
            "failures": e.state.failures,
            "successes": e.state.successes,
            "hosts_toml": "rewritten" if changed else "unchanged",
        }
        if new is Health.DOWN:
            self.problems.problem(down_key, "mirror down", result.error, logging.WARNING, **fields)
        elif not self.problems.clear(down_key, "mirror up", **fields):  # says how long it was down
            event(log, "mirror up", **fields)  # down since start-up (apply left it out), never probed down
        if new is Health.DOWN and (changed or self.unavailable(e.registry) is not None):
            self.pulls.wake(e.registry)
        if self._on_change is not None:
            self._on_change()
        return new

    def _rewrite(self, registry: str) -> bool:
        if self.writer is None:
            return False
        from nodeagent.mirrorhealth.failover import NotOwnedError

        entries = self._registries[registry]
        keep = [e for e in entries if e.state.health is Health.UP and e.writable()]
        if not keep and registry in self.mirror_only:
            # never the last mirror of a mirror-only registry: without one, containerd would fall
            # back to the registry itself. Keep what the file lists now (reported down).
            keep = [e for e in entries if e.in_file] or list(entries)
        active = tuple(e.written() for e in keep)
        try:
            changed = self.writer.write(registry, active)
        except NotOwnedError as err:
            self._write_failed.discard(registry)
            event(
                log,
                "hosts.toml not owned by nodeagent: left alone",
                logging.WARNING,
                registry=registry,
                error=str(err),
            )
            return False
        except OSError as err:
            self.problems.problem(
                f"write:{registry}", "cannot rewrite hosts.toml", str(err), logging.ERROR, registry=registry
            )
            self._write_failed.add(registry)
            return False
        self._write_failed.discard(registry)
        self.problems.clear(f"write:{registry}", "hosts.toml rewritten again", registry=registry)
        for e in entries:
            e.in_file = any(e is k for k in keep)
        return changed

    async def _loop(self, e: WatchedMirror) -> None:
        while True:
            started = self._clock()
            key = f"loop:{e.registry}:{e.label}"
            try:
                await self.probe_once(e)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug in one probe loop must not stop the others
                why = f"{type(err).__name__}: {err}"
                self.problems.problem(
                    key, "mirror probe loop error", why, logging.ERROR, registry=e.registry, mirror=e.label
                )
            else:
                self.problems.clear(
                    key, "mirror probe loop error cleared", registry=e.registry, mirror=e.label
                )
            delay = probes.next_interval(self.settings.interval, self._rng) - (self._clock() - started)
            await self._sleep(max(0.0, delay))

    async def run(self) -> None:
        """The daemon worker: probe every mirror until cancelled."""
        if not self._mirrors:
            return
        event(
            log,
            "mirror health started",
            mirrors=len(self._mirrors),
            interval=self.settings.interval,
            timeout=self.settings.timeout,
            failures_before_down=self.settings.failures_before_down,
            successes_before_up=self.settings.successes_before_up,
            hold_time=self.settings.hold_time,
        )
        # credentials first, all of them, then one rewrite per registry: a rewrite while another
        # mirror's first fetch is still running would leave that mirror out
        with_creds = [e for e in self._mirrors if e.source is not None]
        await asyncio.gather(*(self.refresh_credentials(e, rewrite=False) for e in with_creds))
        for registry in dict.fromkeys(e.registry for e in with_creds):
            self._rewrite(registry)
        async with asyncio.TaskGroup() as tg:
            for e in self._mirrors:
                tg.create_task(self._loop(e), name=f"mirrorhealth:{e.registry}:{e.label}")

    # --- stuck pulls (stuckpulls.py) ---------------------------------------------------------------
    def watch(self, registry: str) -> contextlib.AbstractContextManager[asyncio.Event | None]:
        return self.pulls.watch(registry)

    def unavailable(self, registry: str) -> str | None:
        return self.pulls.unavailable(registry)

    async def run_with_failover(
        self, registry: str, call: Callable[[], Awaitable[T]]
    ) -> tuple[T, str | None]:
        """The daemon's pull wrapper (``StuckPulls.run_with_failover``)."""
        return await self.pulls.run_with_failover(registry, call)

    # --- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The ``mirrorHealth`` section of the daemon status file (``mirrorhealth/report.py``)."""
        from nodeagent.mirrorhealth.report import section

        return section(self._mirrors, self.mirror_only)


def ca_resolver(paths: Paths, hosts_dir: str) -> Callable[[str, str], Path]:
    """Map a mirror's configured CA path as containerd does: absolute paths are host paths (under
    ``--root``), relative ones are relative to the registry's hosts.toml directory."""

    def resolve(registry: str, ca: str) -> Path:
        if ca.startswith("/"):
            return paths.host(ca)
        return child(paths.hosts_dir(hosts_dir), registry) / ca

    return resolve


def from_config(
    config: Config,
    paths: Paths,
    metrics: Metrics | None = None,
    *,
    on_change: Callable[[], None] | None = None,
) -> MirrorHealth | None:
    """The daemon's mirror health worker, or None when there is nothing to watch (no mirrors, or
    ``containerd.mirrorHealth.enabled: false``)."""
    from nodeagent.mirrorhealth.failover import HostsFileWriter

    cd = config.containerd
    if not cd.mirror_health.enabled or not any(ms for _, ms in cd.mirrors):
        return None
    from nodeagent.mirrorhealth.auth import source_for

    return MirrorHealth(
        cd.mirrors,
        cd.mirror_health,
        HostsFileWriter(paths, cd),
        metrics,
        resolve_ca=ca_resolver(paths, cd.hosts_dir),
        on_change=on_change,
        mirror_only=cd.mirror_only,
        source_for=lambda m: source_for(config, paths, m),
    )
