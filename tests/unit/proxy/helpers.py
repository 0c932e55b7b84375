"""In-process proxy in front of the FAKE runtime (tests/unit/cri/fakes.py), plus log capture."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.images.lastused import LastUsed
from nodeagent.proxy.records import PullRecord
from nodeagent.proxy.server import ImageProxy
from nodeagent.run.metrics import Metrics
from nodeagent.util.log import JsonFormatter


@dataclass
class Proxied:
    proxy: ImageProxy
    endpoint: str
    socket: Path
    metrics: Metrics
    last_used: LastUsed
    records: list[PullRecord] = field(default_factory=list)
    upstream_events: list[tuple[bool, str]] = field(default_factory=list)

    def sample(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else float(v)


@asynccontextmanager
async def proxy_for(upstream: str, **kw: Any) -> AsyncIterator[Proxied]:
    d = Path(tempfile.mkdtemp(prefix="na-px-"))
    sock = d / "run" / "cri.sock"
    metrics = Metrics(per_image_series_limit=kw.pop("per_image_series_limit", 100))
    lu = LastUsed(None)
    proxy = ImageProxy(upstream, sock, metrics, lu, **kw)
    p = Proxied(proxy, "unix://" + str(sock), sock, metrics, lu)
    proxy.on_pull = p.records.append
    proxy.on_upstream = lambda ok, err: p.upstream_events.append((ok, err))
    await proxy.start()
    try:
        yield p
    finally:
        await proxy.stop(grace=1.0)
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def captured_log() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(JsonFormatter())
    lg = logging.getLogger("nodeagent")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)


def log_events(buf: io.StringIO, msg: str | None = None) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    return [e for e in out if msg is None or e.get("msg") == msg]


def short_tmp() -> str:
    return tempfile.mkdtemp(prefix="na-px-")


def rm(d: str) -> None:
    shutil.rmtree(d, ignore_errors=True)
    assert not os.path.exists(d)
