"""Last-used times of images, the LRU order eviction follows.

The proxy ``touch()``es an image whenever the kubelet asks for it (ImageStatus, PullImage); the
eviction loop reads it. Persisted in ``Paths.last_used_file`` with the atomic writer so a restart
keeps the order. Keys are image references (``registry/repo:tag``) or image ids (``sha256:...``);
the map is bounded (oldest entries dropped) so memory stays flat on long-lived nodes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from nodeagent.util.atomicio import write_atomic

MAX_ENTRIES = 20_000


class LastUsed:
    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._times: dict[str, float] = {}
        self._dirty = False

    def touch(self, key: str, when: float | None = None) -> None:
        t = self._clock() if when is None else when
        if self._times.get(key, -1.0) < t:
            self._times.pop(key, None)  # re-insert so dict order stays oldest-first
            self._times[key] = t
            self._dirty = True
            if len(self._times) > MAX_ENTRIES:
                oldest = min(self._times, key=self._times.__getitem__)
                del self._times[oldest]

    def get(self, key: str) -> float | None:
        return self._times.get(key)

    def latest(self, keys: list[str] | tuple[str, ...]) -> float | None:
        """The most recent use of any of ``keys`` (an image's id, tags and digests)."""
        ts = [self._times[k] for k in keys if k in self._times]
        return max(ts) if ts else None

    def items(self) -> dict[str, float]:
        return dict(self._times)

    def load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            return  # a corrupt state file only loses LRU hints; never block the daemon
        times = data.get("lastUsed", {}) if isinstance(data, dict) else {}
        for k, v in sorted(times.items(), key=lambda kv: kv[1]):
            if isinstance(k, str) and isinstance(v, int | float):
                self.touch(k, float(v))
        self._dirty = False

    def save(self) -> bool:
        """Write the state file if anything changed since the last save. True if written."""
        if self.path is None or not self._dirty:
            return False
        body = json.dumps({"version": 1, "lastUsed": self._times}, indent=None, sort_keys=True)
        write_atomic(self.path, body + "\n", mode=0o600)
        self._dirty = False
        return True
