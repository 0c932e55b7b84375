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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from nodeagent.config.model import Config, Mirror, MirrorHealthConfig
from nodeagent.credentials import CredentialError, MirrorAuth, MirrorCredentialSource
from nodeagent.log import event, get_logger
from nodeagent.mirrorhealth import probe as probes
from nodeagent.mirrorhealth.state import Health, MirrorState, Thresholds
from nodeagent.paths import Paths, child

if TYPE_CHECKING:
    from nodeagent.metrics import Metrics

log = get_logger(__name__)
T = TypeVar("T")

DEFAULT_REGISTRY = "_default"  # containerd's fallback host namespace


class HostsWriter(Protocol):
    """Rewrites one registry's hosts.toml (implemented by ``failover.HostsFileWriter``)."""

    def endpoints_in_file(self, registry: str) -> frozenset[str] | None:
        """Mirror endpoints the registry's file lists now; None if nodeagent does not own it."""

    def write(self, registry: str, active: tuple[Mirror, ...]) -> bool:
        """Write the file with ``active`` mirrors only; True if it changed. Raises
        ``NotOwnedError`` (file not written by nodeagent) or ``OSError``."""


def normalize_endpoint(endpoint: str) -> str:
    return endpoint.rstrip("/")


@dataclass
class _Mirror:
    registry: str
    mirror: Mirror
    target: probes.ProbeTarget
    state: MirrorState
    label: str  # endpoint without userinfo: safe for labels, logs and status
    in_file: bool = True
    last: probes.ProbeResult | None = None
    last_probe_wall: float | None = None
    last_change_wall: float | None = None
    source: MirrorCredentialSource | None = None  # its credentials, when configured
    auth: MirrorAuth | None = None  # the current credential (a secret: never logged)
    auth_error: str = ""  # why the last fetch failed (no secret inside)
    auth_wall: float | None = None  # when the current credential was fetched
    auth_refreshes: int = 0
    make: Callable[[Mirror], probes.ProbeTarget] | None = None

    def written(self) -> Mirror:
        """The mirror as hosts.toml gets it: with its credentials' Authorization header."""
        if self.auth is None:
            return self.mirror
        from nodeagent.mirrorhealth.auth import with_authorization

        return with_authorization(self.mirror, self.auth.header)

    def writable(self) -> bool:
        return self.source is None or self.auth is not None


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
        self._mirrors: list[_Mirror] = []
        self._registries: dict[str, list[_Mirror]] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._write_failed: set[str] = set()
        for registry, lst in mirrors:
            for m in lst:
                if resolve_ca is not None:
                    reg = registry

                    def ca(path: str, reg: str = reg) -> Path:
                        return resolve_ca(reg, path)

                    make = functools.partial(probes.make_target, registry, resolve_ca=ca)
                else:
                    make = functools.partial(probes.make_target, registry)
                entry = _Mirror(
                    registry, m, make(m), MirrorState(self._thresholds), display_endpoint(m.endpoint)
                )
                entry.make = make
                entry.source = source_for(m) if source_for is not None else None
                self._mirrors.append(entry)
                self._registries.setdefault(registry, []).append(entry)
        self._load_initial_state()

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

    def _set_up_metric(self, e: _Mirror) -> None:
        if self.metrics is not None:
            self.metrics.mirror_up.labels(e.registry, e.label).set(1 if e.state.health is Health.UP else 0)

    def _set_auth_metric(self, e: _Mirror, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.mirror_auth_ok.labels(e.registry, e.label).set(1 if ok else 0)

    # --- credentials ----------------------------------------------------------------------------
    async def refresh_credentials(self, e: _Mirror, *, rewrite: bool = True) -> None:
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
            if msg != e.auth_error:
                event(
                    log,
                    "mirror credentials unavailable",
                    logging.WARNING,
                    registry=e.registry,
                    mirror=e.label,
                    source=e.source.describe(),
                    error=msg,
                )
            e.auth_error = msg
            expires = e.auth.expires() if e.auth is not None else None
            if e.auth is not None and expires is not None and now >= expires:
                e.auth = None  # expired: nothing usable is left to write
            return
        e.auth_error = ""
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
    async def probe_once(self, e: _Mirror) -> Health | None:
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
        if new is None:
            # retry a write that failed earlier; pulls waiting on this registry go again once it lands
            if (
                e.registry in self._write_failed
                and self._rewrite(e.registry)
                and any(x.state.health is Health.DOWN for x in self._registries[e.registry])
            ):
                self._wake(e.registry)
            return None
        e.last_change_wall = self._wall()
        changed = self._rewrite(e.registry)
        self._set_up_metric(e)
        if self.metrics is not None and changed:
            self.metrics.mirror_failovers.labels(e.registry, e.label, new.value).inc()
        event(
            log,
            f"mirror {new.value}",
            logging.WARNING if new is Health.DOWN else logging.INFO,
            registry=e.registry,
            mirror=e.label,
            failures=e.state.failures,
            successes=e.state.successes,
            error=result.error or None,
            hosts_toml="rewritten" if changed else "unchanged",
        )
        if new is Health.DOWN and (changed or self.unavailable(e.registry) is not None):
            self._wake(e.registry)
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
            if registry not in self._write_failed:
                event(log, "cannot rewrite hosts.toml", logging.ERROR, registry=registry, error=str(err))
            self._write_failed.add(registry)
            return False
        self._write_failed.discard(registry)
        for e in entries:
            e.in_file = any(e is k for k in keep)
        return changed

    async def _loop(self, e: _Mirror) -> None:
        while True:
            started = self._clock()
            try:
                await self.probe_once(e)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug in one probe loop must not stop the others
                event(
                    log,
                    "mirror probe loop error",
                    logging.ERROR,
                    registry=e.registry,
                    mirror=e.label,
                    error=f"{type(err).__name__}: {err}",
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

    # --- stuck pulls ------------------------------------------------------------------------------
    def registry_key(self, registry: str) -> str | None:
        """The configured registry whose hosts.toml containerd uses for ``registry``, if any."""
        if registry in self._registries:
            return registry
        if DEFAULT_REGISTRY in self._registries:
            return DEFAULT_REGISTRY
        return None

    @contextlib.contextmanager
    def watch(self, registry: str) -> Iterator[asyncio.Event | None]:
        """An event set when a mirror of ``registry`` goes down (after hosts.toml was rewritten);
        None when no configured mirror applies to that registry."""
        key = self.registry_key(registry)
        if key is None:
            yield None
            return
        ev = asyncio.Event()
        self._watchers.setdefault(key, set()).add(ev)
        try:
            yield ev
        finally:
            self._watchers[key].discard(ev)

    def _wake(self, registry: str) -> None:
        for ev in self._watchers.get(registry, ()):
            ev.set()

    def unavailable(self, registry: str) -> str | None:
        """Why a pull from ``registry`` cannot succeed now, or None: a mirror-only registry whose every
        mirror is down and failed its last probe (a mirror that answers again is given its chance)."""
        key = self.registry_key(registry)
        if key is None or key not in self.mirror_only:
            return None
        entries = self._registries[key]
        if any(e.state.health is Health.UP or (e.last is not None and e.last.alive) for e in entries):
            return None
        why = "; ".join(
            f"{e.label}: {e.last.error if e.last is not None else 'not probed yet'}" for e in entries
        )
        return (
            f"nodeagent: {key} is mirror-only (containerd.mirrors.{key}.mirrorOnly) and no mirror is up "
            f"({why}); the registry itself is never used, so the pull fails now instead of waiting"
        )

    @staticmethod
    def _fail(message: str) -> BaseException:
        import grpc

        from nodeagent.proxy.h2grpc import RpcError

        return RpcError(grpc.StatusCode.UNAVAILABLE, message)

    async def run_with_failover(
        self, registry: str, call: Callable[[], Awaitable[T]]
    ) -> tuple[T, str | None]:
        """Run ``call`` (an upstream PullImage); if a mirror of ``registry`` goes down meanwhile,
        cancel it and run it once more. Returns the result and the retry reason (None: no retry).
        A pull from a mirror-only registry without a usable mirror fails at once (UNAVAILABLE, the
        reason in the message), also when that happens while it runs."""
        if (why := self.unavailable(registry)) is not None:
            raise self._fail(why)
        with self.watch(registry) as down:
            if down is None:
                return await call(), None
            pull = asyncio.ensure_future(call())
            waiter = asyncio.ensure_future(down.wait())
            try:
                await asyncio.wait({pull, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if pull.done():
                    return pull.result(), None
            finally:
                waiter.cancel()
                if not pull.done():
                    pull.cancel()
                    await asyncio.gather(pull, return_exceptions=True)
        if (why := self.unavailable(registry)) is not None:
            raise self._fail(why)
        event(log, "pull retried: a mirror went down while it ran", registry=registry)
        return await call(), "mirror_down"

    # --- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The ``mirrors`` section of the daemon status file (``nodeagent status``)."""
        out = []
        for e in self._mirrors:
            item: dict[str, Any] = {
                "registry": e.registry,
                "mirror": e.label,
                "state": e.state.health.value,
                "inHostsToml": e.in_file,
                "consecutiveFailures": e.state.failures,
                "consecutiveSuccesses": e.state.successes,
                "transitions": e.state.transitions,
                "since": e.last_change_wall,
                "authOk": e.last is None or e.last.auth_ok is not False,
            }
            if e.source is not None:  # where the credentials come from and how they fare; no secret
                item["credentials"] = {
                    "source": e.source.describe(),
                    "present": e.auth is not None,
                    "fetchedAt": e.auth_wall,
                    "refreshes": e.auth_refreshes,
                    "error": e.auth_error,
                }
            if e.last is not None:
                item["lastProbe"] = {
                    "at": e.last_probe_wall,
                    "alive": e.last.alive,
                    "status": e.last.status,
                    "error": e.last.error,
                    "durationSeconds": round(e.last.duration, 4),
                }
            out.append(item)
        return {
            "mirrors": out,
            "degraded": any(e.state.health is Health.DOWN for e in self._mirrors),
            "summary": [self._summary_line(e) for e in self._mirrors],
        }

    def _summary_line(self, e: _Mirror) -> str:
        """One line per mirror for ``nodeagent status`` (absolute times: the file is read later)."""
        state = e.state.health.value.upper()
        since = (
            time.strftime(" since %H:%M:%SZ", time.gmtime(e.last_change_wall))
            if e.last_change_wall is not None
            else ""
        )
        if e.last is None:
            probe = "not probed yet"
        elif e.last.alive:
            probe = f"last probe HTTP {e.last.status} in {e.last.duration * 1000:.0f} ms"
        else:
            probe = f"last probe failed: {e.last.error}"
        streak = (
            f"{e.state.failures} failures in a row"
            if e.state.failures
            else f"{e.state.successes} good in a row"
        )
        where = "in hosts.toml" if e.in_file else "out of hosts.toml"
        if e.in_file and e.state.health is Health.DOWN and e.registry in self.mirror_only:
            where += " (mirror-only: the last mirror is never taken out; pulls fail fast)"
        auth = ""
        if e.last is not None and e.last.auth_ok is False:
            auth = "; credentials: " + ("refused" if e.writable() else f"unavailable ({e.auth_error})")
        return f"{e.registry}  {e.label}  {state}{since}; {probe}{auth}; {streak}; {where}"


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
