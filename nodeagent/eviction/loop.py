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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodeagent import memory
from nodeagent.config.model import Config
from nodeagent.cri.runtime import Runtime
from nodeagent.eviction import baked, usage
from nodeagent.eviction.inventory import Inventory
from nodeagent.eviction.policy import (
    IN_USE,
    LRU,
    Container,
    Decision,
    FsUsage,
    Image,
    InUse,
    Plan,
    ProtectMatcher,
    Thresholds,
    in_use_by,
    last_used_of,
    plan,
)
from nodeagent.lastused import LastUsed
from nodeagent.log import event, get_logger
from nodeagent.metrics import EVICTION_ERROR_STAGES as ERROR_STAGES
from nodeagent.metrics import Metrics
from nodeagent.paths import Paths

if TYPE_CHECKING:
    from nodeagent.proxy.records import PullRecord

log = get_logger(__name__)

WARNING, INFO = 30, 20
ERROR_LOG_PERIOD = 600.0  # a persisting error is logged again at most this often
RECENT_EVICTIONS = 20
MAX_ROUNDS = 4  # plan -> remove rounds per cycle while still above low
MAX_REMOVALS_PER_CYCLE = 500
REMOVALS_PER_SECOND = 5.0
REMOVAL_BURST = 10
IN_USE_REFRESH = 60.0  # re-touch an in-use image's last-used time at most this often
DEGRADED_AFTER = 300.0  # a problem (error, low unreachable) lasting this long makes the status degraded
# After a pull that leaves the disk below high, the next cycle waits until pulls have settled this long.
PULL_SETTLE_SECONDS = 2.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
CacheReporter = Callable[[int, int, "float | None", str], None]


class TokenBucket:
    """``rate`` actions per second, bursts of ``burst``; ``acquire()`` waits for a token."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst = rate, float(burst)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def acquire(self) -> float:
        """Take a token, waiting if needed; returns the seconds waited."""
        waited = 0.0
        self._refill()
        while self._tokens < 1.0:
            delay = (1.0 - self._tokens) / self.rate
            await self._sleep(delay)
            waited += delay
            self._refill()
        self._tokens -= 1.0
        return waited


@dataclass
class _Condition:
    since: float
    last_logged: float
    count: int = 1
    message: str = ""


class PeriodicLog:
    """A problem that may persist: logged when it starts, again once per ``period`` while it lasts
    (with for how long and how often), and once when it clears."""

    def __init__(self, period: float = ERROR_LOG_PERIOD, clock: Clock = time.monotonic) -> None:
        self.period = period
        self._clock = clock
        self.active: dict[str, _Condition] = {}

    def problem(self, key: str, msg: str, message: str, level: int = WARNING, **fields: Any) -> bool:
        """Record one occurrence; returns True when a log line was written."""
        now = self._clock()
        c = self.active.get(key)
        if c is None:
            self.active[key] = _Condition(now, now, 1, message)
            event(log, msg, level=level, error=message, **fields)
            return True
        c.count += 1
        c.message = message
        if now - c.last_logged >= self.period:
            c.last_logged = now
            event(
                log,
                msg,
                level=level,
                error=message,
                persisting_seconds=round(now - c.since, 1),
                occurrences=c.count,
                **fields,
            )
            return True
        return False

    def clear(self, key: str, msg: str, **fields: Any) -> bool:
        c = self.active.pop(key, None)
        if c is None:
            return False
        event(log, msg, lasted_seconds=round(self._clock() - c.since, 1), occurrences=c.count, **fields)
        return True

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        return {
            k: {"message": c.message, "persistingSeconds": round(now - c.since, 1), "occurrences": c.count}
            for k, c in self.active.items()
        }


class StageError(Exception):
    def __init__(self, stage: str, error: BaseException | str) -> None:
        self.stage = stage
        super().__init__(str(error))


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
        report_cache: CacheReporter | None = None,
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
        self._report_cache = report_cache
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._measure = measure or usage.measure
        self.bucket = TokenBucket(removals_per_second, removal_burst, monotonic, sleep)
        self.problems = PeriodicLog(error_period, monotonic)
        self._trigger = asyncio.Event()
        self.pull_settle = PULL_SETTLE_SECONDS
        self._settle: asyncio.TimerHandle | None = None
        self._cri: Runtime | None = None
        self._inventory: Inventory | None = None
        self._imagefs: Path | None = None
        self._manifest_key: tuple[int, int] | None = None
        self._manifest: tuple[baked.BakedImage, ...] = ()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVICTIONS)
        self.last_usage: FsUsage | None = None
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
        if self._imagefs is None:  # not measured yet: the cycle finds the image filesystem
            return True
        try:
            fs = self._measure(self._imagefs)
        except Exception:  # the cycle reports it
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
        fs = await self.measure()
        images = await self._list_images(fs)
        users = await self._users()
        self._record_first_seen_and_in_use(images, users)
        return self._plan(images, users, fs, continuing)

    async def make_plan_if_full(self) -> Plan:
        """Plan as if the image filesystem were full, with the usage measured now in ``usage``: its
        ``removal_bytes`` is what eviction could free at most right now (pod pulls' disk check,
        nodeagent/podpulls/disk.py). Changes nothing and records nothing. Raises ``StageError``."""
        fs = await self.measure()
        images = await self._list_images(fs)
        users = await self._users()
        p = plan(
            images,
            users,
            usage=FsUsage(fs.total_bytes, fs.total_bytes),
            thresholds=self.thresholds,
            now=self._clock(),
            last_used=self.last_used.items(),
            protect=self.protect,
            baked=self._baked(),
        )
        return dataclasses.replace(p, usage=fs)

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
        try:
            if self._imagefs is None:
                configured = usage.configured_path(self.config)
                mountpoint = ""
                if not configured:
                    try:
                        info = await self._client().image_fs_info()
                    except Exception as e:
                        raise StageError("usage", e) from None
                    mountpoint = usage.mountpoint_from_imagefs_info(info)
                self._imagefs = usage.imagefs_path(self.paths, configured, mountpoint)
            fs = self._measure(self._imagefs)
        except usage.UsageError as e:
            self._imagefs = None  # look it up again next time (the runtime may have moved it)
            raise StageError("usage", e) from None
        return self._published(fs)

    def _published(self, fs: FsUsage) -> FsUsage:
        self.last_usage = fs
        self.metrics.imagefs_used_ratio.set(fs.ratio)
        return fs

    async def _list_images(self, fs: FsUsage) -> list[Image]:
        try:
            images = await self.inventory.images()
        except Exception as e:
            raise StageError("list", e) from None
        total = sum(i.size for i in images)
        if self._report_cache is not None:
            self._report_cache(len(images), total, fs.ratio, str(self._imagefs or ""))
        else:
            self.metrics.cache_images.set(len(images))
            self.metrics.cache_bytes.set(total)
        return images

    async def _users(self) -> list[Container]:
        try:
            return await self.inventory.users()
        except Exception as e:
            raise StageError("list", e) from None

    def _baked(self) -> tuple[baked.BakedImage, ...]:
        path = self.paths.baked_manifest
        try:
            st = path.stat()
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        except OSError as e:
            raise StageError("manifest", f"{path}: {e.strerror}") from None
        if key != self._manifest_key or key is None:
            try:
                # A broken manifest stops eviction: removing a baked image cannot be undone offline.
                self._manifest = baked.load(path)
            except baked.BakedManifestError as e:
                self._manifest_key = None
                raise StageError("manifest", e) from None
            self._manifest_key = key
        return self._manifest

    def _plan(
        self, images: list[Image], users: list[Container], fs: FsUsage, continuing: bool = False
    ) -> Plan:
        p = plan(
            images,
            users,
            usage=fs,
            thresholds=self.thresholds,
            now=self._clock(),
            last_used=self.last_used.items(),
            protect=self.protect,
            baked=self._baked(),
            continuing=continuing,
        )
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

    def _record_first_seen_and_in_use(self, images: list[Image], users: list[Container]) -> None:
        now = self._clock()
        times = self.last_used.items()
        for img in images:
            if last_used_of(img, times) is None:
                self.last_used.touch(img.id, now)  # first seen: minUnusedAge counts from here
        if not users:
            return
        in_use = InUse(users)
        for img in images:
            if in_use.user(img) is not None:
                t = self.last_used.get(img.id)
                if t is None or now - t >= IN_USE_REFRESH:
                    self.last_used.touch(img.id, now)

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
            users = await self._users()  # a container may have been created since the plan
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
            now = self._clock()
            rec = {
                "at": now,
                "image": d.image.name,
                "id": d.image.id,
                "size": d.image.size,
                "freedBytes": max(0, before.used_bytes - fs.used_bytes),
                "lastUsed": d.last_used,
                "reason": d.reason,
            }
            self.recent.append(rec)
            event(
                log,
                "image evicted",
                image=d.image.name,
                image_id=d.image.id,
                reason=d.reason,
                size_bytes=d.image.size,
                freed_bytes=rec["freedBytes"],
                unused_seconds=None if d.last_used is None else round(now - d.last_used, 1),
                used_ratio=round(fs.ratio, 4),
            )
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
        """The ``eviction`` section of the daemon status file."""
        fs = self.last_usage
        problems = self.problems.snapshot()
        # Degraded (``nodeagent status`` exits 1) only when it lasts: a pull burst of new images
        # makes low unreachable for up to minUnusedAge, and one failed cycle is not an outage.
        lasting = max(DEGRADED_AFTER, 3 * self.interval)
        degraded = any(v["persistingSeconds"] >= lasting for v in problems.values())
        return {
            "imagefsPath": str(self._imagefs or ""),
            "usedBytes": None if fs is None else fs.used_bytes,
            "totalBytes": None if fs is None else fs.total_bytes,
            "usedRatio": None if fs is None else round(fs.ratio, 4),
            "highThresholdPercent": self.thresholds.high_percent,
            "lowThresholdPercent": self.thresholds.low_percent,
            "minUnusedAgeSeconds": self.thresholds.min_unused_age,
            "lastCycleAt": self.last_cycle_at,
            "lastPlan": self.last_plan,
            "lowUnreachable": self.low_unreachable,
            "lastReliefSeconds": self.last_relief_seconds,
            "recentEvictions": list(self.recent),
            "problems": problems,
            "degraded": degraded,
            "summary": self._summary_lines(problems),
        }

    def _summary_lines(self, problems: dict[str, dict[str, Any]]) -> list[str]:
        """What ``nodeagent status`` prints for eviction (the JSON keeps every field)."""
        t = self.thresholds
        fs = self.last_usage
        usage = (
            "imagefs not measured yet"
            if fs is None
            else f"imagefs {fs.ratio:.1%} used ({_mib(fs.used_bytes)} of {_mib(fs.total_bytes)})"
        )
        lines = [
            f"{usage}; removes unused images above {t.high_percent}%, down to {t.low_percent}%, "
            f"keeps images used in the last {t.min_unused_age:g}s"
        ]
        if self.low_unreachable:
            lines.append(
                f"cannot reach {t.low_percent}%: every image left is in use, pinned, baked, protected "
                "or too recent"
            )
        lines.append("recent evictions:" if self.recent else "no evictions since the daemon started")
        for rec in list(self.recent)[-5:]:
            when = time.strftime("%H:%M:%SZ", time.gmtime(rec["at"]))
            lines.append(f"  {when}  {_mib(rec['size']):>10}  {rec['image']}  ({rec['reason']})")
        for key, p in sorted(problems.items()):
            lines.append(f"problem {key}: {p['message']} (for {p['persistingSeconds']:g}s)")
        return lines


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"
