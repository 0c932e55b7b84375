"""CriClient against an in-process FAKE runtime (tests/unit/cri/fakes.py): deadlines, retry
policy, error text."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from nodeagent.cri.client import CriClient, CriError, RetryPolicy, grpc_target, redact
from tests.unit.cri.fakes import FakeClock, Plan, fake_runtime

# gRPC encodes the deadline in the grpc-timeout header rounded up to its unit, so the server can
# see up to about a second more than the client set.
SLACK = 1.5


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def test_every_call_carries_a_deadline() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            async with CriClient(ep, timeout=3.0, pull_timeout=120.0) as c:
                await c.version()
                await c.list_images()
                await c.image_status("busybox")
                await c.remove_image("busybox")
                await c.image_fs_info()
                await c.list_containers()
                await c.list_pod_sandboxes()
                await c.pull_image("busybox")
            short = [s for s in rt.seen if s.method != "PullImage"]
            assert len(short) == 7
            for s in short:
                assert s.time_remaining is not None, s.method
                # RemoveImage gets at least 60 s; everything else the configured 3 s.
                limit = 60.0 if s.method == "RemoveImage" else 3.0
                assert 0 < s.time_remaining <= limit + SLACK, (s.method, s.time_remaining)
            (pull,) = rt.calls("PullImage")
            assert pull.time_remaining is not None and 60 < pull.time_remaining <= 120 + SLACK

    run(main)


def test_pull_deadline_per_call_and_none_means_no_deadline() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            async with CriClient(ep, pull_timeout=None) as c:
                await c.pull_image("a")
                await c.pull_image("b", timeout=5.0)
            a, b = rt.calls("PullImage")
            assert a.time_remaining is None
            assert b.time_remaining is not None and 0 < b.time_remaining <= 5 + SLACK

    run(main)


def test_request_fields_reach_the_runtime() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            async with CriClient(ep) as c:
                ref = await c.pull_image("reg.local/app:1", auth={"username": "u", "password": "p"})
                assert ref == "sha256:" + "a" * 64
                await c.list_images(filter="reg.local/app:1")
            (pull,) = rt.calls("PullImage")
            assert pull.request.image.image == "reg.local/app:1"
            assert pull.request.auth.username == "u"
            (lst,) = rt.calls("ListImages")
            assert lst.request.filter.image.image == "reg.local/app:1"

    run(main)


def test_unavailable_is_retried_then_succeeds() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["ImageStatus"] = Plan(fail_times=2)
            policy = RetryPolicy(attempts=4, base=0.1, max_backoff=2.0, max_elapsed=10.0)
            async with CriClient(ep, retry=policy, sleep=clock.sleep, clock=clock) as c:
                await c.image_status("busybox")
            assert len(rt.calls("ImageStatus")) == 3
            assert len(clock.sleeps) == 2
            assert all(0 <= s <= 0.1 * 2**i for i, s in enumerate(clock.sleeps))

    run(main)


def test_unavailable_retries_are_bounded_by_attempts() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["ListImages"] = Plan(fail_times=100)
            policy = RetryPolicy(attempts=4, max_elapsed=1000.0)
            async with CriClient(ep, retry=policy, sleep=clock.sleep, clock=clock) as c:
                with pytest.raises(CriError) as ei:
                    await c.list_images()
            assert len(rt.calls("ListImages")) == 4
            assert ei.value.code == grpc.StatusCode.UNAVAILABLE
            assert ei.value.attempts == 4
            assert "after 4 attempts" in str(ei.value)

    run(main)


def test_unavailable_retries_are_bounded_by_total_time() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["ListImages"] = Plan(fail_times=1000)
            # Backoff grows to 1 s; at most 3 s of sleeping allowed in total.
            policy = RetryPolicy(attempts=1000, base=1.0, max_backoff=1.0, max_elapsed=3.0)
            async with CriClient(ep, retry=policy, sleep=clock.sleep, clock=lambda: clock.now) as c:
                with pytest.raises(CriError):
                    await c.list_images()
            assert sum(clock.sleeps) <= 3.0
            assert len(rt.calls("ListImages")) == len(clock.sleeps) + 1 < 1000

    # Backoff jitter is random; the bound must hold whatever it draws.
    for _ in range(3):
        clock = FakeClock()
        run(main)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
    ],
)
def test_other_codes_are_not_retried(code: grpc.StatusCode) -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["PullImage"] = Plan(fail_times=5, fail_code=code, fail_details="nope")
            async with CriClient(ep) as c:
                with pytest.raises(CriError) as ei:
                    await c.pull_image("busybox")
            assert len(rt.calls("PullImage")) == 1
            assert ei.value.code == code

    run(main)


def test_deadline_exceeded_is_final_and_named() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["ImageStatus"] = Plan(delay=2.0)
            async with CriClient(ep, timeout=0.2) as c:
                with pytest.raises(CriError) as ei:
                    await c.image_status("busybox")
            assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert len(rt.calls("ImageStatus")) == 1

    run(main)


def test_a_pull_with_its_own_retry_loop_is_not_retried_by_the_client() -> None:
    # prefetch retries pulls itself (retry=False): the two must not multiply
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["PullImage"] = Plan(fail_times=1)
            async with CriClient(ep) as c:
                with pytest.raises(CriError) as ei:
                    await c.pull_image("reg.local/a:1", retry=False)
            assert ei.value.code == grpc.StatusCode.UNAVAILABLE
            assert len(rt.calls("PullImage")) == 1

    run(main)


def test_error_names_endpoint_call_and_code_and_masks_credentials() -> None:
    secret = "hunter2-canary-0123"

    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["PullImage"] = Plan(
                fail_times=1,
                fail_code=grpc.StatusCode.UNKNOWN,
                fail_details=f"failed to pull: 401 Unauthorized (tried password {secret})",
            )
            async with CriClient(ep) as c:
                with pytest.raises(CriError) as ei:
                    await c.pull_image("reg.local/private:1", auth={"username": "bob", "password": secret})
            msg = str(ei.value)
            assert ep in msg
            assert "PullImage" in msg
            assert "UNKNOWN" in msg
            assert "401 Unauthorized" in msg
            assert secret not in msg
            assert secret not in repr(ei.value.args)

    run(main)


def test_missing_socket_fails_fast_with_unavailable() -> None:
    clock = FakeClock()
    d = tempfile.mkdtemp(prefix="na-cri-")
    ep = "unix://" + os.path.join(d, "absent.sock")

    async def main() -> None:
        async with CriClient(ep, sleep=clock.sleep, clock=clock) as c:
            with pytest.raises(CriError) as ei:
                await c.version()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
        assert ei.value.attempts == RetryPolicy().attempts
        assert ep in str(ei.value) and "Version" in str(ei.value)

    run(main)
    os.rmdir(d)


def test_grpc_target_and_redact() -> None:
    assert grpc_target("/run/containerd/containerd.sock") == "unix:///run/containerd/containerd.sock"
    assert grpc_target("unix:///x.sock") == "unix:///x.sock"
    assert grpc_target("127.0.0.1:5000") == "127.0.0.1:5000"
    assert redact("a secret here", ["secret", ""]) == "a *** here"


def test_retry_policy_backoff_is_capped() -> None:
    p = RetryPolicy(base=0.1, max_backoff=0.5)
    assert p.backoff(0, rng=lambda: 1.0) == pytest.approx(0.1)
    assert p.backoff(10, rng=lambda: 1.0) == pytest.approx(0.5)
    assert p.backoff(3, rng=lambda: 0.0) == 0.0


def test_invalid_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        CriClient("unix:///x.sock", timeout=0)
