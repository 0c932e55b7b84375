"""The ImagesReady Node condition (pure). The worker against a real API server and containerd:
tests/integration/test_karpenter_taint.py."""

from __future__ import annotations

from datetime import UTC, datetime

from nodeagent.readiness import CONDITION_TYPE, MAX_MESSAGE, condition

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
