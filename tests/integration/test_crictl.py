"""crictl (the real cri-tools client, grpc-go) through ``nodeagent run`` and straight to containerd.

What users rely on: pointing crictl's ``--image-endpoint`` at nodeagent changes nothing they can see.
Every image subcommand gives the same exit code, stdout and stderr through the proxy as directly
against containerd (after removing timestamps and socket paths): ``pull`` (by tag, by digest, with
``--creds``/``--auth`` against an htpasswd registry, a missing image, a bad reference,
``--pull-timeout``), ``images`` in every output format, ``inspecti``, ``imagefsinfo``, ``rmi`` and
``rmi --prune``; 20 crictl pulls at once all succeed; a list of 300+ images is the same. Every pull
through the proxy is in nodeagent's records; a password given with ``--creds`` never appears in its
log, metrics or status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
from dataclasses import dataclass

from nodeagent.cri.client import CriClient
from tests.integration.test_proxy import value, wait_for_pull_lines
from tests.sandbox import Containerd, NodeAgent, PushedImage, Registry, Sandbox
from tests.sandbox.crictl import Crictl, outcome
from tests.sandbox.oci import push_many
from tests.sandbox.pods import run_container, run_pod
from tests.sandbox.process import wait_until

CANARY = "canary-pw-2c9e71d4"
USAGE = "{{range .status.imageFilesystems}}{{.usedBytes.value}} {{.inodesUsed.value}}{{end}}"


@dataclass
class Clients:
    node: Containerd
    agent: NodeAgent
    proxied: Crictl  # --image-endpoint nodeagent's socket
    direct: Crictl  # --image-endpoint containerd

    @property
    def endpoints(self) -> list[str]:
        return [self.agent.proxy_endpoint, self.node.endpoint]

    def both(self, *args: str) -> tuple[int, str, str]:
        """Run ``crictl ARGS`` through the proxy, then directly; both outcomes must be the same."""
        via = outcome(self.proxied.run(*args), self.endpoints)
        direct = outcome(self.direct.run(*args), self.endpoints)
        assert via == direct, f"crictl {' '.join(args)}:\nvia proxy: {via}\ndirect:    {direct}"
        return via

    def pull_both(self, *args: str) -> tuple[int, str, str]:
        """``crictl pull ARGS`` through the proxy, then (image removed) directly: both really pull."""
        via = outcome(self.proxied.run("pull", *args), self.endpoints)
        if via[0] == 0:
            image_id = via[1].split()[-1]
            assert self.direct.run("rmi", image_id).returncode == 0
        direct = outcome(self.direct.run("pull", *args), self.endpoints)
        assert via == direct, f"crictl pull {' '.join(args)}:\nvia proxy: {via}\ndirect:    {direct}"
        return via


def clients_for(sandbox: Sandbox, node: Containerd) -> Clients:
    agent = sandbox.nodeagent(node)
    return Clients(
        node,
        agent,
        Crictl(
            sandbox.dir / "crictl-proxied",
            image_endpoint=agent.proxy_endpoint,
            runtime_endpoint=node.endpoint,
        ),
        Crictl(sandbox.dir / "crictl-direct", image_endpoint=node.endpoint, runtime_endpoint=node.endpoint),
    )


def test_pull_variants_are_identical_and_recorded(
    sandbox: Sandbox, registry: Registry, containerd: Containerd
) -> None:
    private = sandbox.registry(auth=("puller", CANARY))
    containerd.write_hosts_toml(private.host, private.url)
    img = sandbox.image(registry, "crictl/plain", layers=2, layer_size=256 << 10)
    by_digest = sandbox.image(registry, "crictl/digest", layers=1, layer_size=256 << 10)
    secret = sandbox.image(private, "crictl/secret", layers=1, layer_size=128 << 10)
    big = sandbox.image(registry, "crictl/big", layers=1, layer_size=4 << 20)
    slow = sandbox.throttle_proxy(registry, 256 << 10)  # 4 MiB at 256 KiB/s: ~16 s
    containerd.write_hosts_toml(slow.address, slow.url)
    c = clients_for(sandbox, containerd)
    auth = base64.b64encode(f"puller:{CANARY}".encode()).decode()

    assert c.pull_both(img.reference) == (0, f"Image is up to date for {img.image_id}\n", "")
    assert c.pull_both(by_digest.digest_reference) == (
        0,
        f"Image is up to date for {by_digest.image_id}\n",
        "",
    )
    assert c.pull_both("--creds", f"puller:{CANARY}", secret.reference)[0] == 0
    assert c.pull_both("--auth", auth, secret.reference)[0] == 0

    # containerd 1.6: "... 401 Unauthorized"; 2.x: "... authorization failed: no basic auth credentials"
    code, _, err = c.pull_both(secret.reference)  # no credentials
    assert code == 1 and re.search("401 Unauthorized|authorization failed", err), err
    code, _, err = c.pull_both("--creds", f"puller:wrong-{CANARY}", secret.reference)
    assert code == 1 and re.search("401 Unauthorized|authorization failed", err), err
    code, _, err = c.pull_both(f"{registry.host}/crictl/missing:v1")
    assert code == 1 and "code = NotFound" in err
    code, _, err = c.pull_both("Bad::Reference")
    assert code == 1 and "invalid reference format" in err
    slow_ref = big.reference.replace(registry.host, slow.address, 1)
    t0 = time.monotonic()
    code, _, err = c.pull_both("--pull-timeout", "1s", slow_ref)
    assert code == 1 and "code = DeadlineExceeded" in err
    assert time.monotonic() - t0 < 15  # both gave up after their second, not after the whole image

    # nodeagent saw every pull made through it, with the result a user would expect
    lines = wait_for_pull_lines(c.agent, 9)
    results = [(line["image"], line["result"]) for line in lines]
    assert results == [
        (img.reference, "success"),
        (by_digest.digest_reference, "success"),
        (secret.reference, "success"),
        (secret.reference, "success"),
        (secret.reference, "unauthorized"),
        (secret.reference, "unauthorized"),
        (f"{registry.host}/crictl/missing:v1", "not_found"),
        ("Bad::Reference", "other"),
        (slow_ref, "canceled"),
    ]
    text = c.agent.scrape()
    assert (
        value(text, "nodeagent_image_pulls_total", registry=private.host, result="success", origin="kubelet")
        == 2
    )
    assert (
        value(text, "nodeagent_image_pulls_total", registry=slow.address, result="canceled", origin="kubelet")
        == 1
    )
    assert CANARY not in text and auth not in text
    assert c.agent.stop() == 0  # the final status file and last-used state are written
    leaked = [
        str(p)
        for p in [*c.agent.root.rglob("*"), c.agent.log_path, c.agent.config_path]
        if p.is_file() and (CANARY.encode() in p.read_bytes() or auth.encode() in p.read_bytes())
    ]
    assert leaked == []  # log, status file, last-used state
    assert c.agent.status_file.is_file()


def _pull_directly(node: Containerd, refs: list[str], concurrency: int = 16) -> None:
    async def body() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with CriClient(node.endpoint) as cri:

            async def one(ref: str) -> None:
                async with sem:
                    await cri.pull_image(ref)

            await asyncio.gather(*(one(r) for r in refs))

    asyncio.run(body())


def test_listing_300_images_in_every_format(
    sandbox: Sandbox, registry: Registry, containerd: Containerd
) -> None:
    many = push_many(registry, "crictl/many", 320)
    tagged = sandbox.image(registry, "crictl/tagged", "v1", layers=1, layer_size=64 << 10)
    retag = sandbox.image(registry, "crictl/tagged-too", "v2", layers=1, layer_size=64 << 10)
    digest_only = sandbox.image(registry, "crictl/digest-only", layers=1, layer_size=64 << 10)
    refs = [m.reference for m in many] + [tagged.reference, retag.reference, digest_only.digest_reference]
    _pull_directly(containerd, refs)
    c = clients_for(sandbox, containerd)
    # ImageFsInfo is refreshed every second: let the last pulls settle into it first
    settled: list[str] = []

    def stable() -> bool:
        now = c.direct.run("imagefsinfo", "-o", "go-template", "--template", USAGE).stdout
        same = bool(settled) and settled[-1] == now
        settled.append(now)
        return same

    wait_until("ImageFsInfo stable", stable, 30, interval=1.5)

    code, out, _ = c.both("images", "-q")
    assert code == 0 and len(out.split()) == len(refs)
    assert set(out.split()) == {m.image_id for m in many} | {
        tagged.image_id,
        retag.image_id,
        digest_only.image_id,
    }
    table = c.both("images")[1].splitlines()
    assert table[0].split() == ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"] and len(table) == len(refs) + 1
    assert any(line.split()[:2] == [f"{registry.host}/crictl/digest-only", "<none>"] for line in table)
    for args in (
        ["-o", "table"],
        ["-o", "json"],
        ["-o", "yaml"],
        ["--digests"],
        ["--no-trunc"],
        ["--digests", "--no-trunc", "--pinned"],
        ["-v"],
        ["--filter", "dangling=false"],
        ["--filter", "reference=crictl/tagged"],
        [f"{registry.host}/crictl/many"],
    ):
        code, out, err = c.both("images", *args)
        assert code == 0 and err == "" and out, args
    verbose = c.both("images", "-v")[1]
    assert verbose.count("\nID: ") + verbose.startswith("ID: ") == len(refs)

    for ref in (tagged.reference, tagged.image_id, digest_only.digest_reference, many[7].reference):
        for args in (
            [],
            ["-o", "json"],
            ["-o", "yaml"],
            ["-o", "table"],
            ["-o", "go-template", "--template", "{{.status.id}} {{.status.size}}"],
            ["-q"],
        ):
            code, out, _ = c.both("inspecti", *args, ref)
            assert code == 0 and out, (ref, args)
    assert c.both("inspecti", "-o", "go-template", "--template", "{{.status.id}}", tagged.reference)[1] == (
        tagged.image_id + "\n"
    )
    code, _, err = c.both("inspecti", f"{registry.host}/crictl/never:1")
    assert code == 1 and "no such image" in err

    for args in (
        [],
        ["-o", "json"],
        ["-o", "yaml"],
        ["-o", "table"],
        ["-o", "go-template", "--template", "{{.}}"],
    ):
        code, out, err = c.both("imagefsinfo", *args)
        assert code == 0 and err == "" and "io.containerd.snapshotter" in out, args
    assert '"timestamp": "<NANOS>"' in c.both("imagefsinfo")[1]


def test_rmi_and_prune_are_identical_and_keep_images_in_use(
    sandbox: Sandbox, registry: Registry, pod_node: Containerd
) -> None:
    used = sandbox.image(registry, "crictl/used", layers=1, layer_size=64 << 10, busybox=True)
    spare = [sandbox.image(registry, f"crictl/spare{i}", layers=1, layer_size=64 << 10) for i in range(4)]
    c = clients_for(sandbox, pod_node)

    async def run_used() -> None:
        async with CriClient(pod_node.endpoint) as cri:
            pod = await run_pod(cri, "crictl-prune", log_dir=sandbox.dir / "logs")
            await run_container(cri, pod, used.reference, "app")

    asyncio.run(run_used())
    outputs: dict[str, list[tuple[int, str, str]]] = {}
    for side, cli in (("proxied", c.proxied), ("direct", c.direct)):
        # the same starting point for both: the spare images and the sandbox (pause) image, which
        # containerd 1.6 does not pin, so the first prune removes it
        _pull_directly(pod_node, [s.reference for s in spare] + [pod_node.sandbox_image])
        listed = json.loads(cli.run("images", "-o", "json").stdout)["images"]
        pinned = {i["id"] for i in listed if i.get("pinned")}  # never pruned (2.x pins its pause image)
        runs = [
            cli.run("rmi", spare[0].reference),
            cli.run("rmi", spare[1].image_id),
            cli.run("rmi", f"{registry.host}/crictl/never:1"),
            cli.run("rmi", "--prune"),
            cli.run("rmi", "--prune"),  # nothing left to prune
        ]
        # rmi removes images in parallel: the order of its "Deleted:" lines is not fixed
        outputs[side] = [(r.returncode, "".join(sorted(r.stdout.splitlines(True))), r.stderr) for r in runs]
        outputs[side] = [outcome(subprocess.CompletedProcess([], *o), c.endpoints) for o in outputs[side]]
        left = set(cli.run("images", "-q").stdout.split())
        assert left == {used.image_id} | pinned, side  # the running container's image stays
    assert outputs["proxied"] == outputs["direct"]
    first, by_id, missing, prune, again = outputs["proxied"]
    assert first == (0, f"Deleted: {spare[0].reference}\n", "")
    assert by_id == (0, f"Deleted: {spare[1].reference}\n", "")
    assert missing[0] == 1 and "no such image" in missing[2]
    assert prune[0] == 0 and f"Deleted: {spare[2].reference}\n" in prune[1] and used.reference not in prune[1]
    assert again == (0, "", again[2])


def test_20_parallel_pulls(sandbox: Sandbox, registry: Registry, containerd: Containerd) -> None:
    images: list[PushedImage] = [
        sandbox.image(registry, f"crictl/par{i:02d}", layers=2, layer_size=256 << 10) for i in range(20)
    ]
    c = clients_for(sandbox, containerd)
    results: dict[str, list[tuple[int, str, str]]] = {}
    for side, cli in (("proxied", c.proxied), ("direct", c.direct)):
        procs = [cli.popen("pull", img.reference) for img in images]
        outs = [p.communicate(timeout=300) for p in procs]
        results[side] = [
            outcome(subprocess.CompletedProcess([], p.returncode, o, e), c.endpoints)
            for p, (o, e) in zip(procs, outs, strict=True)
        ]
        if side == "proxied":
            assert c.direct.run("rmi", *[img.image_id for img in images]).returncode == 0
    assert results["proxied"] == results["direct"]
    assert results["proxied"] == [(0, f"Image is up to date for {img.image_id}\n", "") for img in images]
    lines = wait_for_pull_lines(c.agent, 20)
    assert sorted(line["image"] for line in lines) == sorted(img.reference for img in images)
    assert {line["result"] for line in lines} == {"success"}
    text = c.agent.scrape()
    assert (
        value(text, "nodeagent_image_pulls_total", registry=registry.host, result="success", origin="kubelet")
        == 20
    )
    assert value(text, "nodeagent_image_pulls_in_flight") == 0
