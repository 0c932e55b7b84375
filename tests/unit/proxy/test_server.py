"""ImageProxy in-process, in front of the FAKE runtime (tests/unit/cri/fakes.py).

The caller is a real grpc.aio client and the runtime a FAKE grpc.aio server, on unix sockets in /tmp;
the proxy in between speaks HTTP/2 itself (nodeagent.proxy.h2grpc)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from nodeagent.cri.client import CriClient, CriError, RetryPolicy
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.images.lastused import LastUsed
from nodeagent.proxy.records import PullRecord
from nodeagent.proxy.server import CancelSummary, ImageProxy
from nodeagent.run.metrics import Metrics
from tests.unit.cri.fakes import ECHO_METHOD, Plan, fake_runtime
from tests.unit.proxy.helpers import captured_log, log_events, proxy_for, rm, short_tmp

# A protobuf field number no CRI message uses (wire type 2, field 1000): "unknown" to everyone.
UNKNOWN_FIELD = b"\xc2\x3e\x05extra"
NO_RETRY = RetryPolicy(attempts=1)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def raw_call(endpoint: str, method: str, request: bytes, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
    async with grpc.aio.insecure_channel(endpoint) as ch:
        out: bytes = await ch.unary_unary(method)(request, timeout=timeout)
        return out


def test_uninspected_calls_pass_through_byte_for_byte_with_unknown_fields() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            resp = pb.ListImagesResponse.FromString(
                pb.ListImagesResponse(images=[pb.Image(id="sha256:" + "1" * 64, size=7)]).SerializeToString()
                + UNKNOWN_FIELD
            )
            rt.plans["ListImages"] = Plan(response=resp)
            request = pb.ListImagesRequest().SerializeToString() + UNKNOWN_FIELD
            out = await raw_call(p.endpoint, "/runtime.v1.ImageService/ListImages", request)
            assert out.endswith(UNKNOWN_FIELD)  # the runtime's unknown field reached the caller
            assert pb.ListImagesResponse.FromString(out).images[0].size == 7
            (seen,) = rt.calls("ListImages")
            assert seen.request.SerializeToString().endswith(UNKNOWN_FIELD)  # and ours reached it

    run(main())


def test_methods_the_proxy_does_not_know_are_forwarded() -> None:
    async def main() -> None:
        async with fake_runtime() as (_rt, up), proxy_for(up) as p:
            assert await raw_call(p.endpoint, ECHO_METHOD, b"\x00\x01hello") == b"echo:\x00\x01hello"
            assert await raw_call(p.endpoint, ECHO_METHOD, b"") == b"echo:"

    run(main())


def test_inspected_calls_forward_unknown_fields_too() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            req = pb.PullImageRequest(image=pb.ImageSpec(image="reg.local/a:1")).SerializeToString()
            await raw_call(p.endpoint, "/runtime.v1.ImageService/PullImage", req + UNKNOWN_FIELD)
            req = pb.ImageStatusRequest(image=pb.ImageSpec(image="reg.local/a:1")).SerializeToString()
            await raw_call(p.endpoint, "/runtime.v1.ImageService/ImageStatus", req + UNKNOWN_FIELD)
            for m in ("PullImage", "ImageStatus"):  # (the pull also makes a size lookup of its own)
                assert any(s.request.SerializeToString().endswith(UNKNOWN_FIELD) for s in rt.calls(m)), m

    run(main())


def test_caller_deadline_becomes_the_upstream_deadline() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            async with CriClient(p.endpoint, timeout=3.0, pull_timeout=None) as c:
                await c.image_status("a:1")
                await c.list_images()
            mine = [s for s in rt.calls("ImageStatus") if s.request.image.image == "a:1"]  # not size lookups
            assert len(mine) == 1
            for s in mine + rt.calls("ListImages"):
                assert s.time_remaining is not None and 0 < s.time_remaining <= 4.5

    run(main())


def test_pull_deadline_is_kept_per_caller_and_the_last_one_to_leave_cancels_upstream() -> None:
    """PullImage is shared (single-flight), so its upstream call carries no deadline: each caller's
    deadline is kept by the proxy, and the upstream pull is cancelled once no caller waits for it."""

    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["PullImage"] = Plan(delay=30.0)
            async with CriClient(p.endpoint, pull_timeout=None, retry=NO_RETRY) as c:
                with pytest.raises(CriError) as ei:
                    await c.pull_image("reg.local/slow:1", timeout=0.5, retry=False)
            assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            (seen,) = rt.calls("PullImage")
            assert seen.time_remaining is None
            for _ in range(200):
                if rt.cancelled and p.records:
                    break
                await asyncio.sleep(0.02)
            assert rt.cancelled == ["PullImage"]
            (rec,) = p.records
            # The proxy's timer for the caller's deadline and the caller's own reset at that deadline
            # race (both at ~0.5 s): either way the pull is recorded once, as canceled.
            assert rec.code in ("DEADLINE_EXCEEDED", "CANCELLED") and rec.result == "canceled"

    run(main())


def test_upstream_deadline_expiry_reaches_the_caller() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["ImageFsInfo"] = Plan(delay=3.0)
            async with CriClient(p.endpoint, timeout=0.3, retry=NO_RETRY) as c:
                with pytest.raises(CriError) as ei:
                    await c.image_fs_info()
            assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):
                if rt.cancelled:
                    break
                await asyncio.sleep(0.02)
            assert rt.cancelled == ["ImageFsInfo"]  # the upstream call did not outlive the deadline

    run(main())


def test_cancelled_pull_cancels_the_upstream_call_and_is_recorded() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["PullImage"] = Plan(delay=30.0)
            async with CriClient(p.endpoint, pull_timeout=None) as c:
                task = asyncio.ensure_future(c.pull_image("reg.local/slow:1"))
                for _ in range(200):
                    if rt.calls("PullImage"):
                        break
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            for _ in range(200):
                if rt.cancelled and p.records:
                    break
                await asyncio.sleep(0.01)
            assert rt.cancelled == ["PullImage"]
            (rec,) = p.records
            assert rec.result == "canceled" and rec.code == "CANCELLED"
            assert p.sample("nodeagent_image_pulls_in_flight") == 0

    run(main())


def test_upstream_status_and_message_reach_the_caller_and_the_record() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            msg = 'failed to resolve reference "reg.local/a:9": reg.local/a:9: not found'
            rt.plans["PullImage"] = Plan(fail_times=1, fail_code=grpc.StatusCode.NOT_FOUND, fail_details=msg)
            async with CriClient(p.endpoint, retry=NO_RETRY) as c:
                with pytest.raises(CriError) as ei:
                    await c.pull_image("reg.local/a:9")
            assert ei.value.code == grpc.StatusCode.NOT_FOUND and ei.value.details == msg
            await p.proxy.drain_records()
            (rec,) = p.records
            assert (rec.result, rec.registry, rec.error) == ("not_found", "reg.local", msg)
            assert (
                p.sample(
                    "nodeagent_image_pulls_total", registry="reg.local", result="not_found", origin="kubelet"
                )
                == 1
            )

    run(main())


def test_upstream_down_gives_unavailable_without_waiting_for_the_deadline() -> None:
    d = short_tmp()

    async def main() -> None:
        async with proxy_for("unix://" + os.path.join(d, "absent.sock")) as p:
            async with CriClient(p.endpoint, timeout=30.0, retry=NO_RETRY) as c:
                with pytest.raises(CriError) as ei:
                    await c.image_status("a:1")
                assert ei.value.code == grpc.StatusCode.UNAVAILABLE
                with pytest.raises(CriError) as ei:
                    await c.pull_image("a:1")
                assert ei.value.code == grpc.StatusCode.UNAVAILABLE
            assert p.upstream_events and p.upstream_events[-1][0] is False
            await p.proxy.drain_records()
            assert p.records[0].result == "network"

    run(main())
    rm(d)


def test_upstream_that_comes_back_is_used_again_without_restarting() -> None:
    d = short_tmp()
    sock = os.path.join(d, "up.sock")

    async def main() -> None:
        async with proxy_for("unix://" + sock) as p:
            async with CriClient(p.endpoint, retry=NO_RETRY) as c:
                with pytest.raises(CriError):
                    await c.image_fs_info()
                async with fake_runtime(sock) as (rt, _):
                    ok = False
                    for _ in range(50):  # the proxy's channel reconnects within ~1 s
                        try:
                            await c.image_fs_info()
                            ok = True
                            break
                        except CriError:
                            await asyncio.sleep(0.1)
                    assert ok
                    assert rt.calls("ImageFsInfo")
            assert p.upstream_events[-1] == (True, "")

    run(main())
    rm(d)


def test_concurrent_pulls_are_not_serialized() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["PullImage"] = Plan(delay=0.5)
            async with CriClient(p.endpoint) as c:
                await asyncio.gather(*(c.pull_image(f"reg.local/i{i}:1") for i in range(6)))
            assert rt.max_active == 6

    run(main())


def test_image_status_counts_hits_and_misses_and_touches_last_used() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            async with CriClient(p.endpoint) as c:
                await c.image_status("reg.local/a:1")  # fake answers "absent" by default
                img = pb.Image(id="sha256:" + "b" * 64, repo_tags=["reg.local/b:1"], size=5)
                rt.plans["ImageStatus"] = Plan(response=pb.ImageStatusResponse(image=img))
                await c.image_status("reg.local/b:1")
                await c.image_status("reg.local/b:1")
            assert p.sample("nodeagent_image_cache_requests_total", result="miss") == 1
            assert p.sample("nodeagent_image_cache_requests_total", result="hit") == 2
            assert p.last_used.get("reg.local/b:1") is not None
            assert p.last_used.get("sha256:" + "b" * 64) is not None
            assert p.last_used.get("reg.local/a:1") is None

    run(main())


def test_successful_pull_metrics_log_line_and_listener() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            ref = "sha256:" + "c" * 64
            rt.plans["PullImage"] = Plan(response=pb.PullImageResponse(image_ref=ref), delay=0.2)
            rt.plans["ImageStatus"] = Plan(response=pb.ImageStatusResponse(image=pb.Image(id=ref, size=4096)))
            with captured_log() as buf:
                async with CriClient(p.endpoint) as c:
                    assert await c.pull_image("busybox:1.36") == ref
                await p.proxy.drain_records()
            (rec,) = p.records
            assert isinstance(rec, PullRecord)
            assert (rec.image, rec.registry, rec.result, rec.bytes, rec.image_ref) == (
                "busybox:1.36",
                "docker.io",
                "success",
                4096,
                ref,
            )
            assert 0.2 <= rec.duration < 5
            assert (
                p.sample(
                    "nodeagent_image_pulls_total", registry="docker.io", result="success", origin="kubelet"
                )
                == 1
            )
            assert p.sample("nodeagent_image_pull_bytes_total", registry="docker.io") == 4096
            assert (
                p.sample(
                    "nodeagent_image_pull_duration_seconds_count",
                    registry="docker.io",
                    result="success",
                    origin="kubelet",
                )
                == 1
            )
            assert p.sample(
                "nodeagent_image_last_pull_duration_seconds", image="docker.io/library/busybox:1.36"
            ) == pytest.approx(rec.duration)
            (line,) = log_events(buf, "pull")
            assert line["image"] == "busybox:1.36" and line["registry"] == "docker.io"
            assert line["result"] == "success" and line["bytes"] == 4096
            assert line["duration_seconds"] >= 0.2 and line["throughput_bytes_per_second"] > 0
            assert p.last_used.get("busybox:1.36") is not None and p.last_used.get(ref) is not None

    run(main())


def test_credentials_never_reach_logs_metrics_records_or_the_caller() -> None:
    canary = "canary-PW-7f3e9a1d"

    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["PullImage"] = Plan(
                fail_times=1,
                fail_code=grpc.StatusCode.UNKNOWN,
                fail_details=f"401 Unauthorized: bad credentials user=bob password={canary}",
            )
            with captured_log() as buf:
                async with CriClient(p.endpoint, retry=NO_RETRY) as c:
                    with pytest.raises(CriError) as ei:
                        await c.pull_image("reg.local/priv:1", auth={"username": "bob", "password": canary})
                    await c.pull_image("reg.local/priv:1", auth={"username": "bob", "auth": canary})
                await p.proxy.drain_records()
            assert rt.calls("PullImage")[0].request.auth.password == canary  # forwarded intact
            from prometheus_client import generate_latest

            assert canary not in str(ei.value)
            assert canary not in buf.getvalue()
            assert canary not in generate_latest(p.metrics.registry).decode()
            assert all(canary not in repr(r.to_json()) for r in p.records)
            assert p.records[0].result == "unauthorized"

    run(main())


def test_per_image_gauge_keeps_only_the_most_recent_images() -> None:
    async def main() -> None:
        async with fake_runtime() as (_rt, up), proxy_for(up, per_image_series_limit=3) as p:
            async with CriClient(p.endpoint) as c:
                for i in range(5):
                    await c.pull_image(f"reg.local/img{i}:1")
            await p.proxy.drain_records()
            present = [
                i
                for i in range(5)
                if p.metrics.registry.get_sample_value(
                    "nodeagent_image_last_pull_duration_seconds", {"image": f"reg.local/img{i}:1"}
                )
                is not None
            ]
            assert present == [2, 3, 4]

    run(main())


def test_pull_wrapper_retry_reason_is_recorded() -> None:
    async def main() -> None:
        calls = []

        async def wrapper(registry: str, call: Any) -> tuple[bytes, str | None]:
            calls.append(registry)
            await call()  # pretend the first attempt was abandoned
            return await call(), "mirror_down"

        async with fake_runtime() as (rt, up), proxy_for(up, pull_wrapper=wrapper) as p:
            with captured_log() as buf:
                async with CriClient(p.endpoint) as c:
                    await c.pull_image("reg.local/a:1")
                await p.proxy.drain_records()
            assert calls == ["reg.local"] and len(rt.calls("PullImage")) == 2
            assert p.records[0].retry_reason == "mirror_down"
            (line,) = log_events(buf, "pull")
            assert line["retried"] is True and line["retry_reason"] == "mirror_down"

    run(main())


def test_proxy_socket_mode_and_removal() -> None:
    async def main() -> None:
        async with fake_runtime() as (_rt, up), proxy_for(up) as p:
            mode = stat.S_IMODE(os.stat(p.socket).st_mode)
            assert mode == 0o660
            assert stat.S_ISSOCK(os.stat(p.socket).st_mode)
            sock = p.socket
        assert not sock.exists()

    run(main())


def test_long_upstream_errors_are_bounded_in_records_and_for_the_caller() -> None:
    # A 10 KB grpc-message would exceed the kubelet's default 8 KiB metadata limit, and grpc then
    # drops the whole status at random ("Stream removed"): the caller gets the first 4 KiB instead,
    # through a channel with grpc's default limits, as the kubelet has. Repeated: the drop is random.
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            msg = "failed to pull: " + "x" * 10_000
            rt.plans["PullImage"] = Plan(fail_times=20, fail_code=grpc.StatusCode.UNKNOWN, fail_details=msg)
            async with grpc.aio.insecure_channel(p.endpoint) as ch:
                pull = ch.unary_unary("/runtime.v1.ImageService/PullImage")
                req = pb.PullImageRequest(image=pb.ImageSpec(image="reg.local/a:1")).SerializeToString()
                for _ in range(20):
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        await pull(req, timeout=10)
                    details = ei.value.details() or ""
                    assert ei.value.code() == grpc.StatusCode.UNKNOWN
                    assert len(details.encode()) <= 4096 and details.endswith("(truncated by nodeagent)")
                    assert msg.startswith(details.removesuffix(" ... (truncated by nodeagent)"))
            await p.proxy.drain_records()
            assert len(p.records[0].error) <= 2000 and p.records[0].error.endswith("(truncated)")

    run(main())


def test_cancelled_pulls_past_the_cap_are_summed_up_in_one_line_per_period() -> None:
    async def main() -> None:
        summary = CancelSummary(burst=3, period=0.3)
        with captured_log() as buf:
            allowed = [summary.allow("reg.local") for _ in range(50)]
            assert allowed == [True] * 3 + [False] * 47
            await asyncio.sleep(0.5)  # the period ends: one line for the 47
            assert summary.allow("reg.local")  # a new period records again
        lines = log_events(buf, "pulls canceled by callers, not recorded one by one")
        assert len(lines) == 1
        assert lines[0]["count"] == 47 and lines[0]["registries"] == {"reg.local": 47}

    run(main())


def test_start_on_a_listening_socket_serves_it_and_leaves_its_path_alone() -> None:
    async def main() -> None:
        d = short_tmp()
        path = os.path.join(d, "activated.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(16)
        async with fake_runtime() as (_, up):
            proxy = ImageProxy(up, Path(d) / "unused.sock", Metrics(), LastUsed(None))
            await proxy.start(sock)
            async with CriClient("unix://" + path, retry=RetryPolicy(attempts=1)) as c:
                await c.image_status("reg.local/a:1")
            assert not (Path(d) / "unused.sock").exists()
            await proxy.stop(grace=1.0)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # not ours to remove
        rm(d)

    run(main())
