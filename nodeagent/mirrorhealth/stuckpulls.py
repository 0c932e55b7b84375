"""Pulls stuck on a mirror that went down, and pulls that cannot succeed now.

containerd reads hosts.toml once per pull, so a pull that started on a mirror which then died keeps
trying it. The mirror health worker rewrites hosts.toml without the dead mirror and calls
``wake(registry)``; every pull of that registry waiting in ``run_with_failover`` (the daemon's pull
wrapper) is then cancelled upstream and run once more. A mirror-only registry with no mirror up
fails its pulls at once with the reason (UNAVAILABLE) instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from nodeagent.apply.targets.mirrors import DEFAULT_REGISTRY  # containerd's fallback host namespace
from nodeagent.mirrorhealth.state import Health
from nodeagent.mirrorhealth.watched import WatchedMirror
from nodeagent.util.log import event, get_logger

log = get_logger(__name__)
T = TypeVar("T")


class StuckPulls:
    def __init__(
        self, registries: Mapping[str, Sequence[WatchedMirror]], mirror_only: frozenset[str]
    ) -> None:
        self._registries = registries  # the worker's, live: states change as probes come in
        self.mirror_only = mirror_only
        self._watchers: dict[str, set[asyncio.Event]] = {}

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

    def wake(self, registry: str) -> None:
        """A mirror of ``registry`` went down and hosts.toml no longer lists it: pulls go again."""
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
