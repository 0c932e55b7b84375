"""What a peer can make the proxy hold (``Limits``) and the rate-limited protocol log."""

from __future__ import annotations

import time
from dataclasses import dataclass

from nodeagent.util.log import event, get_logger

log = get_logger(__package__)  # one logger for the package: "nodeagent.proxy.h2grpc"

# h2 is fed at most this much per step, so a flood of tiny frames is cut off after one step past
# its threshold instead of after everything one read returned (up to 256 KiB: ~29,000 frames).
_FEED_STEP = 16 * 1024
# At the connection limit a connection that has not sent a call yet may be closed to make room, but
# not in its first moment: a client that just connected is about to send one.
_NEW_CONNECTION_GRACE = 0.5
_IDLE_CLIENT_GRACE = 10.0  # ...and one that has made calls only after this long without any


@dataclass(frozen=True, slots=True)
class Limits:
    """What one peer (or all of them) can make the proxy hold. docs/proxy.md explains each."""

    max_connections: int = 32  # kubelet connections at once (idle ones are closed to admit new ones)
    max_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS per connection
    max_calls: int = 256  # calls being answered at once, all connections (more: REFUSED_STREAM)
    max_connection_calls: int = 8  # calls started upstream at once per connection (more wait)...
    long_calls: frozenset[str] = frozenset()  # ...not counting these (pulls: seconds to minutes)
    max_header_list: int = 16 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE (decoded bytes of one block)
    stream_window: int = 65_535  # receive window per kubelet stream (SETTINGS_INITIAL_WINDOW_SIZE)
    connection_window: int = 256 * 1024  # receive window per kubelet connection
    request_budget: int = 4 * 1024 * 1024  # request bytes held (not yet complete) per connection
    total_request_budget: int = 16 * 1024 * 1024  # the same, all connections
    upstream_stream_window: int = 128 * 1024  # response bytes held per call (the upstream's window)
    send_timeout: float = 30.0  # a caller that takes none of its answer for this long is dropped
    request_timeout: float = 30.0  # a request must arrive whole within this
    handshake_timeout: float = 5.0  # preface and SETTINGS within this
    idle_timeout: float = 300.0  # a connection with no call for this long is closed (GOAWAY)
    flood_period: float = 10.0
    max_settings: int = 1000  # control frames per connection and period before ENHANCE_YOUR_CALM
    max_pings: int = 2000
    max_resets: int = 1000
    max_window_updates: int = 20_000
    max_empty_frames: int = 10_000  # DATA without payload nor END_STREAM, unknown and PRIORITY frames


# Control frames counted per connection and period (indexes into ``FloodCounter.counts``).
SETTINGS, PING, RESETS, WINDOW_UPDATES, EMPTY = range(5)


class FloodCounter:
    """Control frames one connection sent in the current ``flood_period``; ``over(now)`` names the
    kind past its cap (then the connection is closed with ENHANCE_YOUR_CALM), None while within."""

    __slots__ = ("counts", "limits", "period")

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.period = now
        self.counts = [0, 0, 0, 0, 0]  # settings, pings, resets, window updates, empty frames

    def over(self, now: float) -> str | None:
        if now - self.period >= self.limits.flood_period:
            self.period = now
            self.counts = [0, 0, 0, 0, 0]
            return None
        lim = self.limits
        c = self.counts
        return next(
            (
                name
                for name, n, cap in (
                    ("SETTINGS", c[SETTINGS], lim.max_settings),
                    ("PING", c[PING], lim.max_pings),
                    ("RST_STREAM", c[RESETS], lim.max_resets),
                    ("WINDOW_UPDATE", c[WINDOW_UPDATES], lim.max_window_updates),
                    ("empty frames", c[EMPTY], lim.max_empty_frames),
                )
                if n > cap
            ),
            None,
        )


class LogLimiter:
    """At most ``burst`` lines per kind and ``period``; the rest are counted and reported in one
    summary line when the next period starts (an attack costs a bounded number of log lines)."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        self.burst = burst
        self.period = period
        self._start = 0.0
        self._counts: dict[str, int] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._start >= self.period:
            self.flush()
            self._start = now
        n = self._counts.get(kind, 0) + 1
        self._counts[kind] = n
        if n <= self.burst:
            return True
        self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
        return False

    def flush(self) -> None:
        for kind, n in self._suppressed.items():
            event(log, "proxy log lines suppressed", level=30, kind=kind, count=n, period_seconds=self.period)
        self._suppressed = {}
        self._counts = {}
