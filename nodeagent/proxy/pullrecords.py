"""Pull records: the metrics, the JSON log line and the listeners of each pull; image sizes; the cap
on the records of cancelled pulls. Part of ``ImageProxy`` (nodeagent.proxy.server)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.images.lastused import LastUsed
from nodeagent.proxy.h2grpc import Channel
from nodeagent.proxy.methods import STATUS
from nodeagent.proxy.records import (
    PullRecord,
    classify,
    image_label,
    is_image_id,
)
from nodeagent.run.metrics import Metrics
from nodeagent.util.log import event, get_logger

if TYPE_CHECKING:
    from nodeagent.proxy.pulls import _Pull

log = get_logger("nodeagent.proxy.server")

# Image size lookup after a pull: short; a slow answer only loses the byte count of one record.
SIZE_LOOKUP_TIMEOUT = 5.0
SIZE_CACHE_ENTRIES = 4096
MAX_ERROR_CHARS = 2000
# Pulls the caller cancelled: this many per period are recorded one by one; the rest are summed up
# in one log line per period (not recorded, not counted in the metrics: a rapid-reset burst).
CANCELED_RECORDS_PER_PERIOD = 20
CANCELED_PERIOD = 10.0


class CancelSummary:
    """Caps the pull records of cancelled pulls per period; counts the rest per registry and writes
    one summary line when the period ends."""

    def __init__(self, burst: int = CANCELED_RECORDS_PER_PERIOD, period: float = CANCELED_PERIOD) -> None:
        self.burst = burst
        self.period = period
        self._start = 0.0
        self._recorded = 0
        self._skipped: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def allow(self, registry: str) -> bool:
        now = time.monotonic()
        if now - self._start >= self.period:
            self.flush()
            self._start = now
        if self._recorded < self.burst:
            self._recorded += 1
            return True
        self._skipped[registry] = self._skipped.get(registry, 0) + 1
        if self._timer is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(max(0.0, self._start + self.period - now), self.flush)
        return False

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._skipped:
            event(
                log,
                "pulls canceled by callers, not recorded one by one",
                level=30,
                count=sum(self._skipped.values()),
                registries=dict(sorted(self._skipped.items())[:20]),
                period_seconds=self.period,
            )
        self._skipped = {}
        self._recorded = 0


class PullRecording:
    """The pull records of ``ImageProxy``."""

    if TYPE_CHECKING:  # provided by ImageProxy (nodeagent.proxy.server)
        metrics: Metrics
        last_used: LastUsed
        on_pull: Callable[[PullRecord], None] | None
        _channel: Channel | None
        _sizes: dict[str, int]

    async def _record_pull(
        self,
        pull: _Pull,
        duration: float,
        code: str,
        details: str,
        response: bytes,
        retry_reason: str | None,
    ) -> None:
        image, registry = pull.image, pull.registry
        result = "success" if code == "OK" else classify(code, details)
        if len(details) > MAX_ERROR_CHARS:  # bounded log lines and status file
            details = details[: MAX_ERROR_CHARS - 15] + "... (truncated)"
        rec = PullRecord(
            image=image,
            registry=registry,
            result=result,
            duration=duration,
            started_at=pull.started_at,
            code=code,
            error=details,
            retry_reason=retry_reason,
            origin=pull.origin,
            joined=pull.joined,
        )
        if code == "OK":
            with contextlib.suppress(Exception):  # a malformed answer only loses the ref
                rec.image_ref = pb.PullImageResponse.FromString(response).image_ref
            rec.bytes = await self._image_size(rec.image_ref or image)
            self.last_used.touch(image)
            if rec.image_ref:
                self.last_used.touch(rec.image_ref)
        m = self.metrics
        reg = m.registry_label(registry)
        m.pulls.labels(registry=reg, result=rec.result, origin=rec.origin).inc()
        m.pull_duration.labels(registry=reg, result=rec.result, origin=rec.origin).observe(duration)
        if rec.ok:
            m.pull_bytes.labels(registry=reg).inc(rec.bytes)
        m.observe_last_pull(image_label(image), duration)
        fields: dict[str, Any] = {
            "image": image,
            "registry": registry,
            "origin": rec.origin,
            "result": rec.result,
            "duration_seconds": round(duration, 4),
            "bytes": rec.bytes,
            "throughput_bytes_per_second": round(rec.throughput, 1),
        }
        if rec.joined:
            fields["joined"] = True
        if rec.image_ref:
            fields["image_ref"] = rec.image_ref
        if not rec.ok:
            fields["code"] = code
            fields["error"] = details
        if retry_reason:
            fields["retried"] = True
            fields["retry_reason"] = retry_reason
        event(log, "pull", **fields)
        if self.on_pull is not None:
            try:
                self.on_pull(rec)
            except Exception:
                log.exception("pull listener failed")

    async def _image_size(self, ref: str) -> int:
        """The image's size from the upstream (ImageStatus); remembered per image id, whose content
        never changes, so pulling an image that is already there costs no second call."""
        size = self._sizes.get(ref)
        if size is not None:
            return size
        size = await self._lookup_size(ref)
        if size and is_image_id(ref):
            if len(self._sizes) >= SIZE_CACHE_ENTRIES:
                del self._sizes[next(iter(self._sizes))]  # the oldest
            self._sizes[ref] = size
        return size

    async def _lookup_size(self, ref: str) -> int:
        assert self._channel is not None
        request = pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)).SerializeToString()
        try:
            raw = await self._channel.unary(STATUS, request, timeout=SIZE_LOOKUP_TIMEOUT)
            resp = pb.ImageStatusResponse.FromString(raw)
        except Exception:
            return 0
        return int(resp.image.size) if resp.HasField("image") else 0
