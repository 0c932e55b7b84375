"""The eviction loop inside ``nodeagent run``.

Runs every ``eviction.interval``, right after a pull through the proxy that leaves the image
filesystem at or above the high threshold, and a moment after pulls settle otherwise. Each
cycle measures the image filesystem (statvfs). At or above the high threshold it plans (see
``policy``) and removes images one at a time through CRI RemoveImage, least recently used first:

- right before each removal it lists containers and sandboxes again; an image that gained a user
  since the plan was made is kept (``in_use``);
- removals are rate-limited (a token bucket on an injectable clock);
- after each removal it measures again and stops as soon as usage is at or below the low threshold
  (CRI image sizes are compressed sizes: what a removal frees on disk is only known afterwards);
  if the plan runs out while still above low, it plans again (bounded rounds);
- if what is left is all protected (in use, pinned, baked, ``images.protect``, too recent) it says
  so: ``nodeagent_image_eviction_low_unreachable`` = 1 and a warning log line (repeated once per
  period while it lasts).

Every image the loop sees without a last-used record gets one ("first seen"), and images in use get
"now", so ``minUnusedAge`` counts from when an image was last needed, like the kubelet's image GC.
The last-used state is saved (atomically) after each cycle that changed it, so a restart keeps the
LRU order. Errors never stop the loop: each kind is counted, logged when it starts, again once per
period while it persists (with how long), and once when it clears (WALinuxAgent style).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodeagent.config.model import Config
from nodeagent.cri.runtime import Runtime
from nodeagent.eviction import gather, report
from nodeagent.eviction.gather import Inputs, StageError
from nodeagent.eviction.inventory import Inventory
from nodeagent.eviction.policy import (
    IN_USE,
    LRU,
    Decision,
    FsUsage,
    Plan,
    ProtectMatcher,
    Thresholds,
    in_use_by,
    plan,
)
from nodeagent.eviction.usage import Imagefs, configured_path
from nodeagent.images.lastused import LastUsed
from nodeagent.run.cachestats import EVICTION, CacheStats
from nodeagent.run.metrics import EVICTION_ERROR_STAGES as ERROR_STAGES
from nodeagent.run.metrics import Metrics
from nodeagent.util import memory
from nodeagent.util.log import event, get_logger
from nodeagent.util.paths import Paths
from nodeagent.util.throttle import LOG_PERIOD as ERROR_LOG_PERIOD
from nodeagent.util.throttle import Clock, PeriodicLog, Sleep, TokenBucket

if TYPE_CHECKING:
    from nodeagent.proxy.records import PullRecord

log = get_logger(__name__)

RECENT_EVICTIONS = 20
MAX_ROUNDS = 4  # plan -> remove rounds per cycle while still above low
MAX_REMOVALS_PER_CYCLE = 500
REMOVALS_PER_SECOND = 5.0
REMOVAL_BURST = 10
IN_USE_REFRESH = 60.0  # re-touch an in-use image's last-used time at most this often
# After a pull that leaves the disk below high, the next cycle waits until pulls have settled this long.
PULL_SETTLE_SECONDS = 2.0


@dataclass
class CycleResult:
    usage_before: FsUsage | None = None
    usage_after: FsUsage | None = None
    triggered: bool = False
    removed: list[Decision] = field(default_factory=list)
    kept_now_in_use: list[Decision] = field(default_factory=list)
    low_unreachable: bool = False
    error: str = ""


class EvictionLoop:
    def __init__(
        self,
        config: Config,
        paths: Paths,
        metrics: Metrics,
        last_used: LastUsed,
        *,
        cri_factory: Callable[[], Runtime] | None = None,
        cache: CacheStats | None = None,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        measure: Callable[[Path], FsUsage] | None = None,
        removals_per_second: float = REMOVALS_PER_SECOND,
        removal_burst: int = REMOVAL_BURST,
        error_period: float = ERROR_LOG_PERIOD,
    ) -> None:
        ev = config.eviction
        self.config = config
        self.paths = paths
        self.metrics = metrics
        self.last_used = last_used
        self.thresholds = Thresholds(ev.high_threshold_percent, ev.low_threshold_percent, ev.min_unused_age)
        metrics.set_eviction_thresholds(ev.high_threshold_percent, ev.low_threshold_percent)
        self.interval = ev.interval
        self.protect = ProtectMatcher(config.images.protect)
        self._cri_factory = cri_factory
        # the cache figures and their gauges (the daemon's, shared: the image filesystem is located once)
        self.cache = cache or CacheStats(
            metrics, Imagefs(paths, configured_path(config), measure), clock=clock
        )
        self.imagefs = self.cache.imagefs
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self.bucket = TokenBucket(removals_per_second, removal_burst, monotonic, sleep)
        self.problems = PeriodicLog(error_period, monotonic, log)
        self._trigger = asyncio.Event()
        self.pull_settle = PULL_SETTLE_SECONDS
        self._settle: asyncio.TimerHandle | None = None
        self._cri: Runtime | None = None
        self._inventory: Inventory | None = None
        self.manifest = gather.BakedManifest(paths.baked_manifest)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVICTIONS)
        self.last_usage: FsUsage | None = None
        self.last_usage_at: float | None = None  # when last_usage was measured (wall clock)
        self.last_cycle_at: float | None = None
        self.last_plan: dict[str, Any] = {}
        self.low_unreachable = False
        self.pressure_since: float | None = None  # monotonic time usage was first seen >= high
        self.last_relief_seconds: float | None = None  # high -> under low, last time it happened
        self.cycles = 0

    # --- wiring -------------------------------------------------------------------------------
    def on_pull(self, record: PullRecord) -> None:
        """Pull listener. A pull, even a failed one, may have filled the disk: one statvfs says
        whether it is at or above high, and then a cycle runs at once. Below high, the cycle (which
        also refreshes the cache size and image count) runs once pulls have settled for
        ``pull_settle`` seconds, so a burst of pulls, or cached pulls, do not list every image and
        container once per pull while the kubelet starts its pods."""
        if self._at_or_above_high():
            self._trigger.set()
            return
        if self._settle is not None:
            self._settle.cancel()
        self._settle = asyncio.get_running_loop().call_later(self.pull_settle, self._trigger.set)

    def _at_or_above_high(self) -> bool:
        try:
            fs = self.imagefs.measure_located()
        except Exception:  # the cycle reports it
            return True
        if fs is None:  # not located yet: the cycle finds the image filesystem
            return True
        return self.thresholds.at_or_above_high(self._published(fs))  # the gauge follows every pull

    async def run(self) -> None:
        """The daemon worker: a cycle every interval and after pulls (``on_pull``), until cancelled."""
        try:
            while True:
                self._trigger.clear()
                await self.cycle()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._trigger.wait(), self.interval)
        finally:
            await self.close()

    async def close(self) -> None:
        cri, self._cri, self._inventory = self._cri, None, None
        if cri is not None:
            with contextlib.suppress(Exception):
                await cri.close()
        self._save_last_used()

    def _client(self) -> Runtime:
        if self._cri is None:
            if self._cri_factory is not None:
                self._cri = self._cri_factory()
            else:
                from nodeagent.cri.client import CriClient

                self._cri = CriClient(self.config.cri.endpoint, self.config.cri.timeout)
            self._inventory = Inventory(self._cri)
        return self._cri

    @property
    def inventory(self) -> Inventory:
        self._client()
        assert self._inventory is not None
        return self._inventory

    # --- one cycle ----------------------------------------------------------------------------
    async def cycle(self, plan: Plan | None = None) -> CycleResult:
        """Measure; at or above high, remove LRU images until at or below low. Never raises.

        ``plan``: act on this plan (from ``make_plan()``) instead of making one now.
        """
        self.cycles += 1
        result = CycleResult()
        try:
            p = plan if plan is not None else await self.make_plan()
            await self._act(p, result)
        except StageError as e:
            result.error = f"{e.stage}: {e}"
            self.metrics.eviction_errors.labels(stage=e.stage).inc()
            self.problems.problem(f"error:{e.stage}", "eviction error", str(e), stage=e.stage)
        except Exception as e:  # a bug must not kill the loop either; it is counted and logged
            result.error = f"internal: {type(e).__name__}: {e}"
            self.metrics.eviction_errors.labels(stage="internal").inc()
            if self.problems.problem("error:internal", "eviction error", result.error, stage="internal"):
                log.exception("eviction cycle failed")
        finally:
            self.last_cycle_at = self._clock()
            self._save_last_used()
            memory.note_large()  # the image and container listings were large: give memory back
        if not result.error:
            for stage in ERROR_STAGES:
                if stage != "state":
                    self.problems.clear(f"error:{stage}", "eviction error cleared", stage=stage)
        return result

    async def make_plan(self, continuing: bool = False) -> Plan:
        """Measure the image filesystem, read images and their users, record first-seen and in-use
        times, and plan. Raises ``StageError``."""
        inputs = await self.gather()
        gather.record_use(self.last_used, inputs, self._clock(), IN_USE_REFRESH)
        return self._plan(inputs, continuing)

    async def make_plan_if_full(self) -> Plan:
        """Plan as if the image filesystem were full, with the usage measured now in ``usage``: its
        ``removal_bytes`` is what eviction could free at most right now (pod pulls' disk check,
        nodeagent/podpulls/disk.py). Changes nothing and records nothing. Raises ``StageError``."""
        inputs = await self.gather()
        full = FsUsage(inputs.usage.total_bytes, inputs.usage.total_bytes)
        p = self._plan(dataclasses.replace(inputs, usage=full), record=False)
        return dataclasses.replace(p, usage=inputs.usage)

    async def gather(self) -> Inputs:
        """``gather.gather`` with the loop's client, published as the cache figures."""
        inputs = await gather.gather(self._client(), self.imagefs, self.inventory)
        self.last_usage, self.last_usage_at = inputs.usage, self._clock()
        self.cache.report({i.id: i.size for i in inputs.images}, inputs.usage, EVICTION)
        return inputs

    async def _act(self, p: Plan, result: CycleResult) -> None:
        fs = p.usage
        result.usage_before = result.usage_after = fs
        result.triggered = p.triggered
        if not p.triggered:
            self._pressure_over(fs)
            if self.pressure_since is None:  # at or below low (or no episode): low is reached
                self._set_low_unreachable(False, p)
            return
        if self.pressure_since is None:
            self.pressure_since = self._monotonic()
            event(
                log,
                "imagefs above the high threshold",
                used_ratio=round(fs.ratio, 4),
                used_bytes=fs.used_bytes,
                high_percent=self.thresholds.high_percent,
                low_percent=self.thresholds.low_percent,
                candidates=len(p.removals),
            )
        rounds = 0
        while True:
            rounds += 1
            progressed, fs = await self._execute(p, result)
            result.usage_after = fs
            if fs.used_bytes <= p.low_bytes or not progressed or rounds >= MAX_ROUNDS:
                break
            if len(result.removed) >= MAX_REMOVALS_PER_CYCLE:
                break
            # The plan ran out (sizes are compressed sizes, layers are shared): plan again.
            p = await self.make_plan(continuing=True)
            fs = p.usage
            if not p.removals:
                break
        if fs.used_bytes <= p.low_bytes:
            self._pressure_over(fs)
            self._set_low_unreachable(False, p)
        else:
            # Above low with nothing left to remove (or stopped by the round/removal bounds).
            unreachable = p.low_unreachable or not p.removals
            result.low_unreachable = unreachable
            self._set_low_unreachable(unreachable, p, fs)

    async def measure(self) -> FsUsage:
        """The image filesystem's usage now (the gauge follows). Raises ``StageError``."""
        return self._published(await gather.measure(self._client(), self.imagefs))

    def _published(self, fs: FsUsage) -> FsUsage:
        self.last_usage, self.last_usage_at = fs, self._clock()
        self.cache.report_usage(fs)
        return fs

    def _plan(self, inputs: Inputs, continuing: bool = False, record: bool = True) -> Plan:
        fs = inputs.usage
        p = plan(
            inputs.images,
            inputs.users,
            usage=fs,
            thresholds=self.thresholds,
            now=self._clock(),
            last_used=self.last_used.items(),
            protect=self.protect,
            baked=self.manifest.load(),
            continuing=continuing,
        )
        if not record:
            return p
        self.last_plan = {
            "at": self._clock(),
            "usedBytes": fs.used_bytes,
            "totalBytes": fs.total_bytes,
            "triggered": p.triggered,
            "removals": len(p.removals),
            "removalBytes": p.removal_bytes,
            "lowUnreachable": p.low_unreachable,
            "kept": {
                r: n
                for r in ("in_use", "pinned", "baked", "protected", "too_recent")
                if (n := len(p.kept(r)))
            },
        }
        return p

    async def _execute(self, p: Plan, result: CycleResult) -> tuple[bool, FsUsage]:
        """Remove ``p.removals`` one at a time until usage is at or below low. Returns (removed
        anything, usage now)."""
        fs = p.usage
        progressed = False
        cri = self._client()
        for d in p.removals:
            if fs.used_bytes <= p.low_bytes or len(result.removed) >= MAX_REMOVALS_PER_CYCLE:
                break
            await self.bucket.acquire()
            users = await gather.users(self.inventory)  # a container may have been created since the plan
            user = in_use_by(d.image, users)
            if user is not None:
                kept = Decision(d.image, "keep", IN_USE, d.last_used, user)
                result.kept_now_in_use.append(kept)
                event(
                    log,
                    "image kept: in use since the plan was made",
                    image=d.image.name,
                    image_id=d.image.id,
                    user=user,
                )
                continue
            try:
                await cri.remove_image(d.image.id)
            except Exception as e:
                raise StageError("remove", f"{d.image.name}: {e}") from None
            progressed = True
            result.removed.append(d)
            self.metrics.evictions.labels(reason=LRU).inc()
            self.metrics.evicted_bytes.inc(d.image.size)
            before = fs
            fs = await self.measure()
            self.recent.append(report.evicted(d, before, fs, self._clock()))
        return progressed, fs

    def _pressure_over(self, fs: FsUsage) -> None:
        if self.pressure_since is None:
            return
        low_bytes = fs.total_bytes * self.thresholds.low_percent // 100
        if fs.used_bytes > low_bytes:
            return  # between low and high after an episode: keep the episode open
        self.last_relief_seconds = self._monotonic() - self.pressure_since
        self.pressure_since = None
        event(
            log,
            "imagefs under the low threshold",
            used_ratio=round(fs.ratio, 4),
            seconds_from_high=round(self.last_relief_seconds, 3),
        )

    def _set_low_unreachable(self, value: bool, p: Plan, fs: FsUsage | None = None) -> None:
        self.low_unreachable = value
        self.metrics.eviction_low_unreachable.set(1 if value else 0)
        if value:
            assert fs is not None
            self.problems.problem(
                "low_unreachable",
                "cannot reach the low threshold: every image left is in use, pinned, baked, "
                "protected or too recent",
                f"{fs.ratio:.1%} used, low threshold {self.thresholds.low_percent}%",
                used_ratio=round(fs.ratio, 4),
                kept=self.last_plan.get("kept", {}),
            )
        else:
            self.problems.clear("low_unreachable", "low threshold reachable again")

    def _save_last_used(self) -> None:
        try:
            self.last_used.save()
        except OSError as e:
            self.metrics.eviction_errors.labels(stage="state").inc()
            self.problems.problem(
                "error:state", "eviction error", f"{self.last_used.path}: {e}", stage="state"
            )
        else:
            self.problems.clear("error:state", "eviction error cleared", stage="state")

    # --- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The ``eviction`` section of the daemon status file (``eviction/report.py``)."""
        return report.section(self)
