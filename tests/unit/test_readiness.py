"""The ImagesReady Node condition (pure). The worker against a real API server and containerd:
tests/integration/test_karpenter_taint.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lightkube import ApiError
from lightkube.models.meta_v1 import Status
from lightkube.resources.core_v1 import Node

from nodeagent import config
from nodeagent.images import readiness
from nodeagent.images.readiness import CONDITION_TYPE, MAX_MESSAGE, condition
from nodeagent.util.paths import Paths
from tests.unit.cri.fakes import FakeRuntime
from tests.unit.test_prefetch import runtime

NOW = datetime(2026, 12, 6, 11, 0, 0, tzinfo=UTC)


def test_true_when_nothing_is_missing() -> None:
    c = condition([], 2, NOW)
    assert c == {
        "type": CONDITION_TYPE,
        "status": "True",
        "reason": "RequiredImagesPresent",
        "message": "all 2 required image(s) present",
        "lastHeartbeatTime": "2026-12-06T11:00:00Z",
        "lastTransitionTime": "2026-12-06T11:00:00Z",
    }
    assert condition([], 0, NOW)["message"] == "no required images"


def test_false_names_the_missing_images_bounded() -> None:
    c = condition(["r.example/a:1", "r.example/b:2"], 3, NOW)
    assert (c["status"], c["reason"]) == ("False", "RequiredImagesMissing")
    assert c["message"] == "2 of 3 required image(s) missing: r.example/a:1, r.example/b:2"
    long = condition([f"r.example/image-{i}:1" for i in range(500)], 500, NOW)["message"]
    assert len(long) == MAX_MESSAGE and long.endswith("...")


# --- the worker: a stand-in API client and the FAKE runtime (tests/unit/cri/fakes.py) ----------------
class Api:
    """``patch`` answers 404 ``not_found`` times (the Node not registered yet), then accepts."""

    def __init__(self, not_found: int) -> None:
        self.not_found = not_found
        self.bodies: list[tuple[str, dict[str, Any]]] = []

    async def patch(self, res: Any, name: str, obj: dict[str, Any]) -> None:
        assert res is Node.Status  # nodes/NAME/status, the part NodeRestriction lets a node change
        self.bodies.append((name, obj))
        if self.not_found:
            self.not_found -= 1
            raise ApiError(status=Status(code=404, message='nodes "n1" not found'))


class Daemon:
    def __init__(self, cri: FakeRuntime) -> None:
        self.cri = cri
        self.dirty = 0

    def mark_status_dirty(self) -> None:
        self.dirty += 1


def test_worker_checks_required_images_and_writes_once_the_node_exists(tmp_path: Path) -> None:
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        await asyncio.sleep(0)

    cfg = config.load_text(
        "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\npodPulls: {nodeName: n1}\n"
        "images:\n  prefetch:\n    - {image: r.example/a:1, required: true}\n    - {image: r.example/b:1}\n"
        f"  credentialProviderConfig: {tmp_path}/none.json\n  dockerConfig: {tmp_path}/none.json\n"
    )
    cri = runtime(fail={"r.example/a:1": None})  # a required image that does not exist (yet)
    clock = [NOW]
    worker = readiness.ImagesReady(
        cfg, Paths.at(str(tmp_path)), Daemon(cri), sleep=sleep, now=lambda: clock[0]
    )
    api = Api(not_found=2)
    worker._client, worker.node = api, "n1"

    async def main() -> None:
        missing = await worker._check_images()
        assert missing == ["r.example/a:1"]  # the optional image is no reason to wait
        await worker._write(missing)
        assert sleeps == [1.0, 2.0]  # 404 twice: backoff until the kubelet registered the Node
        assert worker.status()["state"] == "reported" and worker.status()["reported"] == "False"
        assert {n for n, _ in api.bodies} == {"n1"} and len(api.bodies) == 3
        cond = api.bodies[-1][1]["status"]["conditions"][0]
        assert (cond["type"], cond["status"]) == (readiness.CONDITION_TYPE, "False")

        cri.missing.clear()  # the image appears in its registry: the next round pulls it
        missing = await worker._check_images()
        assert missing == [] and cri.pulls[-1][0] == "r.example/a:1"
        assert worker.written != worker._key(missing)  # changed: written again
        clock[0] = NOW + timedelta(minutes=1)
        await worker._write(missing)
        first = api.bodies[-1][1]["status"]["conditions"][0]
        assert first["status"] == "True" and first["lastTransitionTime"] == "2026-12-06T11:01:00Z"
        clock[0] = NOW + timedelta(minutes=6)  # the heartbeat: same status, transition time kept
        await worker._write(missing)
        beat = api.bodies[-1][1]["status"]["conditions"][0]
        assert beat["lastHeartbeatTime"] == "2026-12-06T11:06:00Z"
        assert beat["lastTransitionTime"] == "2026-12-06T11:01:00Z"

    asyncio.run(main())
