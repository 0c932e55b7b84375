"""Single-flight in the proxy (nodeagent/proxy/singleflight.py + ImageProxy's PullImage path), in front
of the FAKE runtime (tests/unit/cri/fakes.py). The integration tests repeat the important cases with
real containerd, registries and the kubelet (tests/integration/test_pod_pulls.py)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import grpc
import pytest

from nodeagent.cri.client import CriClient, CriError, RetryPolicy
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.proxy.h2grpc import RpcError
from nodeagent.proxy.singleflight import credentials_fingerprint, pull_key
from tests.unit.cri.fakes import Plan, fake_runtime
from tests.unit.proxy.helpers import proxy_for

NO_RETRY = RetryPolicy(attempts=1)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def until(check: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def request(image: str, auth: pb.AuthConfig | None = None, handler: str = "") -> bytes:
    return pb.PullImageRequest(
        image=pb.ImageSpec(image=image, runtime_handler=handler), auth=auth
    ).SerializeToString()


def test_key_normalizes_images_and_reads_auth_as_the_pair_it_holds() -> None:
    a = pb.PullImageRequest.FromString(request("busybox"))
    b = pb.PullImageRequest.FromString(request("docker.io/library/busybox:latest"))
    assert pull_key(a) == pull_key(b)
    pair = pb.AuthConfig(username="u", password="p")
    encoded = pb.AuthConfig(auth=base64.b64encode(b"u:p").decode(), server_address="r.local")
    assert credentials_fingerprint(pair) == credentials_fingerprint(encoded) != ""
    assert credentials_fingerprint(pb.AuthConfig(username="u", password="q")) != credentials_fingerprint(pair)
    assert credentials_fingerprint(pb.AuthConfig()) == credentials_fingerprint(None) == ""
    assert "p" not in credentials_fingerprint(pair).replace("p", "")  # a hash, not the text
    c = pb.PullImageRequest.FromString(request("busybox", handler="kata"))
    assert pull_key(c) != pull_key(a)


def test_identical_pulls_share_one_upstream_call_and_each_caller_gets_the_answer() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["PullImage"] = Plan(
                delay=0.5, response=pb.PullImageResponse(image_ref="sha256:" + "a" * 64)
            )
            async with CriClient(p.endpoint, pull_timeout=None, retry=NO_RETRY) as c:
                refs = await asyncio.gather(*(c.pull_image("reg.local/app:1") for _ in range(5)))
                internal = asyncio.ensure_future(p.proxy.pull(request("reg.local/app:1"), origin="pod"))
                await asyncio.sleep(0)
                assert await c.pull_image("reg.local/app:1") == "sha256:" + "a" * 64
                assert pb.PullImageResponse.FromString(await internal).image_ref == "sha256:" + "a" * 64
            assert refs == ["sha256:" + "a" * 64] * 5
            assert len(rt.calls("PullImage")) == 2  # the five, then the pod's pull with the kubelet's
            await p.proxy.drain_records()
            assert len(p.records) == 7 and all(r.ok for r in p.records)
            assert sum(r.joined for r in p.records) == 5
            assert p.sample("nodeagent_image_pull_joins_total", origin="kubelet") == 5
            assert {r.origin for r in p.records} == {"kubelet", "pod"}
            assert len(p.proxy.flights) == 0

    run(main())


def test_different_credentials_or_handlers_never_share() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["PullImage"] = Plan(delay=0.3)
            async with CriClient(p.endpoint, pull_timeout=None, retry=NO_RETRY) as c:
                await asyncio.gather(
                    c.pull_image("reg.local/private:1", auth={"username": "alice", "password": "a"}),
                    c.pull_image("reg.local/private:1", auth={"username": "bob", "password": "b"}),
                    c.pull_image("reg.local/private:1"),
                    p.proxy.pull(request("reg.local/private:1", handler="kata"), origin="pod"),
                )
            assert len(rt.calls("PullImage")) == 4
            users = sorted(s.request.auth.username for s in rt.calls("PullImage"))
            assert users == ["", "", "alice", "bob"]
            assert p.sample("nodeagent_image_pull_joins_total", origin="kubelet") == 0

    run(main())


def test_one_caller_cancelling_does_not_cancel_the_others() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["PullImage"] = Plan(delay=1.0)
            async with CriClient(p.endpoint, pull_timeout=None, retry=NO_RETRY) as c:
                first = asyncio.ensure_future(c.pull_image("reg.local/app:2"))
                await until(lambda: rt.calls("PullImage"))
                second = asyncio.ensure_future(c.pull_image("reg.local/app:2"))
                pod = asyncio.ensure_future(p.proxy.pull(request("reg.local/app:2"), origin="pod"))
                await until(lambda: p.proxy.in_flight == 3)
                first.cancel()  # the caller that started the upstream pull goes away
                pod.cancel()
                await second
                with pytest.raises(asyncio.CancelledError):
                    await first
            assert rt.cancelled == []  # the upstream pull finished for the one still waiting
            assert len(rt.calls("PullImage")) == 1
            await p.proxy.drain_records()
            codes = sorted(r.code for r in p.records)
            assert codes == ["CANCELLED", "CANCELLED", "OK"]

    run(main())


def test_the_last_caller_leaving_cancels_the_upstream_and_errors_reach_every_caller() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, up), proxy_for(up) as p:
            rt.plans["PullImage"] = Plan(delay=30.0)
            async with CriClient(p.endpoint, pull_timeout=None, retry=NO_RETRY) as c:
                a = asyncio.ensure_future(c.pull_image("reg.local/slow:1"))
                await until(lambda: rt.calls("PullImage"))
                b = asyncio.ensure_future(c.pull_image("reg.local/slow:1"))
                await until(lambda: p.proxy.in_flight == 2)
                a.cancel()
                b.cancel()
                await asyncio.gather(a, b, return_exceptions=True)
            await until(lambda: rt.cancelled == ["PullImage"])
            assert len(p.proxy.flights) == 0

            rt.plans["PullImage"] = Plan(
                fail_times=99, fail_code=grpc.StatusCode.NOT_FOUND, fail_details="not found", delay=0.3
            )
            with pytest.raises(RpcError) as ei:
                await asyncio.gather(
                    p.proxy.pull(request("reg.local/gone:1"), origin="pod"),
                    p.proxy.pull(request("reg.local/gone:1"), origin="pod"),
                )
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            async with CriClient(p.endpoint, pull_timeout=None, retry=NO_RETRY) as c:
                with pytest.raises(CriError):
                    await c.pull_image("reg.local/gone:1")
            await p.proxy.drain_records()
            assert (
                p.sample(
                    "nodeagent_image_pulls_total", registry="reg.local", result="not_found", origin="pod"
                )
                == 2
            )

    run(main())


def test_a_client_naming_itself_prefetch_is_recorded_as_prefetch_anything_else_as_kubelet() -> None:
    async def main() -> None:
        async with fake_runtime() as (_rt, up), proxy_for(up) as p:
            async with CriClient(p.endpoint, pull_timeout=None, retry=NO_RETRY) as c:
                await c.pull_image("reg.local/a:1", metadata=(("x-nodeagent-origin", "prefetch"),))
                await c.pull_image("reg.local/b:1", metadata=(("x-nodeagent-origin", "made-up"),))
            await p.proxy.drain_records()
            assert {r.image: r.origin for r in p.records} == {
                "reg.local/a:1": "prefetch",
                "reg.local/b:1": "kubelet",
            }

    run(main())


PREFETCH = (("x-nodeagent-origin", "prefetch"),)


def test_prefetch_through_the_proxy_takes_the_daemons_pull_slots_the_kubelet_never_waits() -> None:
    async def main() -> None:
        from nodeagent.proxy.slots import PullSlots

        slots = PullSlots(1)
        async with fake_runtime() as (rt, up), proxy_for(up, slots=slots) as p:
            rt.plans["PullImage"] = Plan(delay=0.3)
            pod = await slots.acquire((slots.ticket(), 0))  # the one slot: a pod pull holds it
            async with CriClient(p.endpoint, pull_timeout=None, retry=NO_RETRY) as c:
                prefetch = asyncio.ensure_future(c.pull_image("reg.local/pre:1", metadata=PREFETCH))
                kubelet = asyncio.ensure_future(c.pull_image("reg.local/kl:1"))
                await until(lambda: len(rt.calls("PullImage")) == 1)
                await asyncio.sleep(0.1)
                # the kubelet's pull went upstream at once; prefetch's waits for the slot
                assert [s.request.image.image for s in rt.calls("PullImage")] == ["reg.local/kl:1"]
                assert slots.waiting == 1
                # a prefetch of an image already being pulled joins that pull: no slot needed
                joined = await c.pull_image("reg.local/kl:1", metadata=PREFETCH)
                assert joined == "sha256:" + "a" * 64 and slots.waiting == 1
                pod.release()
                await asyncio.gather(prefetch, kubelet)
            assert [s.request.image.image for s in rt.calls("PullImage")] == [
                "reg.local/kl:1",
                "reg.local/pre:1",
            ]
            assert slots.status() == {"limit": 1, "busy": 0, "waiting": 0}
            assert p.sample("nodeagent_image_pull_joins_total", origin="prefetch") == 1

    run(main())


def test_a_prefetch_caller_waiting_for_a_slot_keeps_its_deadline_and_can_cancel() -> None:
    async def main() -> None:
        from nodeagent.proxy.slots import PullSlots

        slots = PullSlots(1)
        async with fake_runtime() as (rt, up), proxy_for(up, slots=slots) as p:
            held = await slots.acquire((slots.ticket(), 0))
            async with CriClient(p.endpoint, pull_timeout=0.3, retry=NO_RETRY) as c:
                with pytest.raises(CriError) as e:
                    await c.pull_image("reg.local/late:1", metadata=PREFETCH)
                assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            await until(lambda: slots.waiting == 0)  # it left the line
            held.release()
            assert rt.calls("PullImage") == [] and slots.busy == 0

    run(main())
