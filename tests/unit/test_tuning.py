from pathlib import Path

import pytest

from nodeagent.apply import tuning
from tests.unit.targets.helpers import config, facts


@pytest.mark.parametrize(
    ("kw", "pulls", "downloads"),
    [
        (dict(cpus=8, memory_bytes=32 * 2**30, nic_speed_mbps=10_000), 8, 3),  # 20 streams / 8 pulls
        (dict(cpus=2, memory_bytes=4 * 2**30, nic_speed_mbps=1_000), 2, 3),
        (dict(cpus=64, memory_bytes=256 * 2**30, nic_speed_mbps=100_000), 10, 10),  # 200 streams / 10
        (dict(cpus=16, memory_bytes=64 * 2**30, nic_speed_mbps=25_000), 10, 5),
        (dict(cpus=8, memory_bytes=3 * 2**30, nic_speed_mbps=10_000), 3, 7),  # memory-bound
        (dict(cpus=8, memory_bytes=32 * 2**30, nic_speed_mbps=None), 8, 3),  # unknown NIC
        (dict(cpus=8, memory_bytes=32 * 2**30, imagefs_bytes=20 * 2**30), 3, 7),  # small disk
        (dict(cpus=1, memory_bytes=2**30, nic_speed_mbps=100), 2, 3),  # never below the floor
    ],
)
def test_auto_rules(tmp_path: Path, kw: dict, pulls: int, downloads: int) -> None:  # type: ignore[type-arg]
    t = tuning.resolve(config(), facts(tmp_path, **kw))
    assert (t.max_parallel_image_pulls.value, t.max_concurrent_downloads.value) == (pulls, downloads)
    assert t.max_parallel_image_pulls.auto and t.max_parallel_image_pulls.reason


def test_explicit_values_win_and_say_so(tmp_path: Path) -> None:
    cfg = config("kubelet:\n  maxParallelImagePulls: 4\ncontainerd:\n  maxConcurrentDownloads: 9\n")
    t = tuning.resolve(cfg, facts(tmp_path))
    assert (t.max_parallel_image_pulls.value, t.max_concurrent_downloads.value) == (4, 9)
    assert str(t.max_concurrent_downloads) == "containerd.maxConcurrentDownloads = 9 (from config)"


def test_serialized_pulls_size_downloads_for_one_pull(tmp_path: Path) -> None:
    cfg = config("kubelet:\n  serializeImagePulls: true\n  maxParallelImagePulls: 1\n")
    t = tuning.resolve(cfg, facts(tmp_path, nic_speed_mbps=2_000))
    assert t.max_concurrent_downloads.value == 4  # 4 streams for 2 Gb/s, all in one pull
