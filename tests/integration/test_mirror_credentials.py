"""Authenticated and mirror-only registry mirrors, with real containerd, real docker-registry
processes and a credential provider plugin speaking the kubelet's exec protocol (issue 15).

- An htpasswd (Basic auth) docker-registry is the pull-through mirror of an anonymous upstream. Its
  credentials come from a test plugin (tests/integration/data/rotating-credential-provider) that hands
  out a different login on every run, with a short cacheDuration, as a cloud provider issues
  short-lived tokens. ``nodeagent apply`` writes the first one into the mirror's ``[host]`` section,
  ``nodeagent run`` rotates it; containerd pulls through the mirror with it. When the plugin fails,
  the mirror leaves hosts.toml once its credentials expire and pulls go to the upstream.
- A mirror-only registry whose upstream is unreachable: pulls are served by the mirror alone
  (credentials from a file); with the mirror down they fail fast with the reason in the pull record,
  and hosts.toml never gains the upstream.

Every password is a canary: it must never appear in logs, metrics, the status file, the apply report
or apply's --dry-run diff.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cri.client import CriClient, CriError
from nodeagent.util.paths import Paths
from tests.integration.test_mirrorhealth import health_status, pull_log
from tests.sandbox import Containerd, PushedImage, Registry, Sandbox
from tests.sandbox.agent import NodeAgent

DATA = Path(__file__).parent / "data"
PLUGIN = "rotating-credential-provider"
CACHE_SECONDS = 12  # the plugin's cacheDuration: nodeagent refreshes at half of it
ROTATION_WINDOW = 60.0  # seconds of continuous pulls while the credentials rotate
HOSTS_DIR = "/etc/containerd/certs.d"


def canary_logins(n: int) -> list[tuple[str, str]]:
    tag = secrets.token_hex(4)
    return [(f"tok{i}", f"CANARY-{tag}-{i}-{secrets.token_hex(8)}") for i in range(n)]


def secret_forms(logins: list[tuple[str, str]]) -> list[str]:
    """Every way a login could leak: the password and the Basic header value built from it."""
    out = []
    for user, password in logins:
        out += [password, base64.b64encode(f"{user}:{password}".encode()).decode()]
    return out


def assert_no_secret(text: str, forms: list[str], where: str) -> None:
    leaked = [f for f in forms if f in text]
    assert not leaked, f"a credential leaked into {where}"


def hosts_file(agent: NodeAgent, registry: str) -> Path:
    return Paths(agent.root).host(f"{HOSTS_DIR}/{registry}/hosts.toml")


def hosts_doc(agent: NodeAgent, registry: str) -> dict[str, Any]:
    return tomllib.loads(hosts_file(agent, registry).read_text())


def make_agent(sandbox: Sandbox, node: Containerd, config: dict[str, Any]) -> NodeAgent:
    """A ``nodeagent run`` (not started) whose hosts dir is the node's: the files apply and the
    daemon write are the ones containerd reads."""
    agent = sandbox.nodeagent(node, start=False, config=config)
    link = Paths(agent.root).host(HOSTS_DIR)
    link.parent.mkdir(parents=True)
    link.symlink_to(node.hosts_dir)
    return agent


def nodeagent_cli(agent: NodeAgent, *args: str) -> subprocess.CompletedProcess[str]:
    agent.root.mkdir(parents=True, exist_ok=True)
    agent.config_path.write_text(json.dumps(agent.config))
    env = dict(os.environ, NODEAGENT_IMDS="off")
    return subprocess.run(
        [sys.executable, "-m", "nodeagent", *args, "-c", str(agent.config_path), "--root", str(agent.root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def install_plugin(agent: NodeAgent, registry: Registry, logins: list[tuple[str, str]]) -> Path:
    """The kubelet's credential provider config and plugin dir, at the AL2023 paths under --root."""
    bindir = Paths(agent.root).host("/etc/eks/image-credential-provider")
    bindir.mkdir(parents=True)
    shutil.copy(DATA / PLUGIN, bindir / PLUGIN)
    state = agent.workdir / "provider-state"
    state.mkdir(parents=True)
    (state / "logins").write_text("".join(f"{u}:{p}\n" for u, p in logins))
    (bindir / "config.json").write_text(
        json.dumps(
            {
                "apiVersion": "kubelet.config.k8s.io/v1",
                "kind": "CredentialProviderConfig",
                "providers": [
                    {
                        "name": PLUGIN,
                        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                        "matchImages": [registry.host],
                        "defaultCacheDuration": "1m",
                        "env": [
                            {"name": "ROTATING_PROVIDER_STATE", "value": str(state)},
                            {"name": "ROTATING_PROVIDER_REGISTRY", "value": registry.host},
                            {"name": "ROTATING_PROVIDER_CACHE", "value": f"{CACHE_SECONDS}s"},
                        ],
                    }
                ],
            }
        )
    )
    return state


def containerd_requests(reg: Registry) -> list[str]:
    """Access-log lines of ``reg`` for requests containerd made (its User-Agent names it); a
    pull-through mirror's own fetches from its upstream say docker/distribution instead."""
    try:
        text = reg.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if " /v2/" in line and "containerd/" in line]


def auth_users(reg: Registry, what: str = "/v2/") -> list[str]:
    """The users the registry authenticated for requests whose URI holds ``what``, in order (the
    ``auth.user.name`` field of its request log lines)."""
    out = []
    for line in reg.log_path.read_text(errors="replace").splitlines():
        if "auth.user.name=" in line and what in line:
            out.append(line.split("auth.user.name=", 1)[1].split()[0].strip('"'))
    return out


async def pull(agent: NodeAgent, ref: str) -> None:
    async with CriClient(agent.proxy_endpoint) as cri:
        await cri.pull_image(ref, timeout=60.0, retry=False)


async def pull_and_remove(agent: NodeAgent, ref: str) -> None:
    async with CriClient(agent.proxy_endpoint) as cri:
        await cri.pull_image(ref, timeout=60.0, retry=False)
        await cri.remove_image(ref)  # the next pull of it fetches its blobs again


def metric(text: str, name: str, labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return None


class HeaderWatch:
    """Polls a hosts.toml in a thread and keeps every distinct Authorization value seen (and any
    moment the file had no header at all), as containerd would read it at pull time."""

    def __init__(self, path: Path, endpoint: str) -> None:
        self.path, self.endpoint = path, endpoint
        self.values: list[str] = []
        self.missing = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            doc = tomllib.loads(self.path.read_text())
            header = doc.get("host", {}).get(self.endpoint, {}).get("header", {}).get("Authorization")
            if header is None:
                self.missing += 1
            elif not self.values or self.values[-1] != header[0]:
                self.values.append(header[0])
            time.sleep(0.1)

    def __enter__(self) -> HeaderWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def authed_mirror(
    sandbox: Sandbox, registry_factory: Callable[..., Registry]
) -> Iterator[tuple[Registry, Registry, list[tuple[str, str]]]]:
    """(anonymous upstream, htpasswd pull-through mirror of it, the mirror's logins)."""
    logins = canary_logins(12)
    upstream = registry_factory()
    mirror = registry_factory(auth=logins[0], more_users=logins[1:], proxy_of=upstream)
    yield upstream, mirror, logins


def test_provider_credentials_rotate_under_continuous_pulls_and_a_failing_provider_sends_pulls_upstream(
    sandbox: Sandbox,
    authed_mirror: tuple[Registry, Registry, list[tuple[str, str]]],
    image_factory: Callable[..., PushedImage],
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream, mirror, logins = authed_mirror
    forms = secret_forms(logins)
    imgs = [image_factory(layers=1, layer_size=64 << 10, to=upstream) for _ in range(6)]
    node = sandbox.containerd([])  # no hosts.toml: nodeagent apply writes it
    agent = make_agent(
        sandbox,
        node,
        {
            "containerd": {
                "hostsDir": HOSTS_DIR,
                "mirrors": {upstream.host: [{"endpoint": mirror.url, "credentials": {"from": "provider"}}]},
                "mirrorHealth": {"interval": "1s", "timeout": "1s"},
            }
        },
    )
    state = install_plugin(agent, mirror, logins)

    # apply --dry-run: the diff shows the header, masked; nothing written
    dry = nodeagent_cli(agent, "apply", "--dry-run", "--flavor", "eks-al2023")
    assert dry.returncode == 0, dry.stderr
    assert '"Authorization" = ["<redacted>"]' in dry.stdout
    assert_no_secret(dry.stdout + dry.stderr, forms, "apply --dry-run")
    assert not hosts_file(agent, upstream.host).exists()

    done = nodeagent_cli(agent, "apply", "--flavor", "eks-al2023")
    assert done.returncode == 0, done.stderr
    path = hosts_file(agent, upstream.host)
    assert path.stat().st_mode & 0o777 == 0o600
    doc = hosts_doc(agent, upstream.host)
    first = doc["host"][mirror.url]["header"]["Authorization"]
    # each plugin run issues a new login: the dry run got the first, apply the second
    assert first == ["Basic " + base64.b64encode(f"{logins[1][0]}:{logins[1][1]}".encode()).decode()]
    assert list(doc["host"]) == [mirror.url]

    agent.start()
    asyncio.run(pull(agent, imgs[0].reference))
    # containerd fetched the blobs from the mirror, authenticated, and never asked the upstream
    assert imgs[0].image.layers[0].digest in mirror.blob_digests_served()
    assert auth_users(mirror, "/blobs/sha256:"), "the mirror logged no authenticated blob GET"
    assert not containerd_requests(upstream)

    # continuous pulls (pull + remove, so blobs are fetched every time) while the credentials rotate
    failures: list[str] = []
    pulls = 0
    t0 = time.monotonic()
    with HeaderWatch(path, mirror.url) as watch:
        while time.monotonic() - t0 < ROTATION_WINDOW:
            ref = imgs[1 + pulls % (len(imgs) - 1)].reference
            try:
                asyncio.run(pull_and_remove(agent, ref))
            except CriError as e:
                failures.append(str(e)[:300])
            pulls += 1
    rotations = len(watch.values) - 1
    with capsys.disabled():
        print(
            f"\n[mirror-credentials] {pulls} pulls in {ROTATION_WINDOW:.0f}s, {len(failures)} failed, "
            f"{rotations} credential rotations, users seen by the mirror: {sorted(set(auth_users(mirror)))}"
        )
    assert failures == []
    assert rotations >= 3
    assert watch.missing == 0  # the header was in the file at every read
    # every pull resolves its tag on the mirror with the login of the moment: the rotated ones in use
    assert len(set(auth_users(mirror, "/manifests/"))) >= 4
    assert not containerd_requests(upstream)
    assert path.stat().st_mode & 0o777 == 0o600

    # the provider fails: the current credentials are kept until they expire, then the mirror is
    # out of hosts.toml (within a probe interval) and pulls go to the upstream
    (state / "fail").touch()
    failed_at = time.monotonic()

    def mirror_out() -> bool:
        return mirror.url not in hosts_doc(agent, upstream.host).get("host", {})

    deadline = failed_at + CACHE_SECONDS + 10
    while not mirror_out() and time.monotonic() < deadline:
        time.sleep(0.2)
    out_after = time.monotonic() - failed_at
    assert mirror_out(), "mirror still in hosts.toml after its credentials expired"
    assert out_after <= CACHE_SECONDS + 2.5  # expiry + one probe interval (and scheduling slack)
    asyncio.run(pull(agent, imgs[0].reference))
    assert containerd_requests(upstream), "the pull did not go to the upstream"

    section = health_status(agent, lambda s: s["mirrors"][0]["state"] == "down")
    (entry,) = section["mirrors"]
    assert entry["authOk"] is False and entry["credentials"]["present"] is False
    assert "credential provider rotating-credential-provider: exit 1" in entry["credentials"]["error"]
    (line,) = section["summary"]
    assert "credentials: unavailable" in line and "out of hosts.toml" in line
    scrape = agent.scrape()
    labels = f'registry="{upstream.host}"'
    assert metric(scrape, "nodeagent_mirror_auth_ok", labels) == 0.0
    assert metric(scrape, "nodeagent_mirror_up", labels) == 0.0

    # no credential anywhere it could leak
    agent.stop()
    assert_no_secret(agent.log_path.read_text(), forms, "the daemon's log")
    assert_no_secret(scrape, forms, "/metrics")
    assert_no_secret(agent.status_file.read_text(), forms, "the status file")
    report = Paths(agent.root).apply_report_file
    assert_no_secret(report.read_text() + done.stdout + done.stderr, forms, "the apply report")


def test_mirror_only_registry_is_served_by_its_mirror_and_fails_fast_when_it_is_down(
    sandbox: Sandbox, registry_factory: Callable[..., Registry], image_factory: Callable[..., PushedImage]
) -> None:
    (login,) = canary_logins(1)
    forms = secret_forms([login])
    mirror = registry_factory(auth=login)
    upstream = sandbox.refused_port()  # the registry itself is unreachable
    registry = f"127.0.0.1:{upstream.port}"
    img = image_factory(layers=1, layer_size=64 << 10, to=mirror, repository="team/app")
    ref = f"{registry}/{img.repository}:{img.tag}"
    node = sandbox.containerd([])
    agent = make_agent(
        sandbox,
        node,
        {
            "containerd": {
                "hostsDir": HOSTS_DIR,
                "mirrors": {
                    registry: {
                        "mirrorOnly": True,
                        "mirrors": [
                            {
                                "endpoint": mirror.url,
                                "credentials": {"from": "file", "path": "/etc/nodeagent/mirror-login"},
                            }
                        ],
                    }
                },
                "mirrorHealth": {
                    "interval": "500ms",
                    "timeout": "500ms",
                    "failuresBeforeDown": 2,
                    "holdTime": "0s",
                },
            }
        },
    )
    login_file = Paths(agent.root).host("/etc/nodeagent/mirror-login")
    login_file.parent.mkdir(parents=True)
    login_file.write_text(f"{login[0]}:{login[1]}\n")
    login_file.chmod(0o600)

    check = nodeagent_cli(agent, "validate")
    assert check.returncode == 0, check.stderr
    assert f"containerd.mirrors.{registry}.mirrorOnly: pulls from {registry} never go to the registry" in (
        check.stderr
    )
    done = nodeagent_cli(agent, "apply", "--flavor", "eks-al2023")
    assert done.returncode == 0, done.stderr
    doc = hosts_doc(agent, registry)
    # the mirror is the only host: a [host] (containerd 1.6 needs one) and the server (no upstream)
    assert doc["server"] == mirror.url and list(doc["host"]) == [mirror.url]

    agent.start()
    asyncio.run(pull(agent, ref))  # upstream unreachable, mirror up: served by the mirror
    assert pull_log(agent, ref)["result"] == "success"

    mirror.stop()
    health_status(agent, lambda s: s["mirrors"][0]["state"] == "down")
    t0 = time.monotonic()
    with pytest.raises(CriError) as failed:
        asyncio.run(pull(agent, f"{registry}/{img.repository}:other"))
    took = time.monotonic() - t0
    assert took < 5.0, f"the pull took {took:.1f}s to fail"
    assert "mirror-only" in str(failed.value)
    record = pull_log(agent, f"{registry}/{img.repository}:other")
    assert record["result"] == "network" and "no mirror is up" in record["error"]
    assert "connection refused" in record["error"]
    doc = hosts_doc(agent, registry)
    assert doc["server"] == mirror.url and list(doc["host"]) == [mirror.url]  # still only the mirror
    (line,) = health_status(agent)["summary"]
    assert "DOWN" in line and "mirror-only" in line and "in hosts.toml" in line

    mirror.start()  # back: pulls succeed again without any restart
    health_status(agent, lambda s: s["mirrors"][0]["state"] == "up")
    asyncio.run(pull(agent, ref))
    agent.stop()
    assert_no_secret(agent.log_path.read_text() + agent.status_file.read_text(), forms, "log/status")
