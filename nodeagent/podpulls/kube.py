"""The Kubernetes API with the node's own identity (lightkube; see docs/pod-pulls.md for the choice).

- ``load_client(path)``: an async client from a kubeconfig (client certificates, tokens or an exec
  credential plugin, as the kubelet's kubeconfig has them); ``KubeconfigError`` names the file and
  the problem, never a credential.
- ``node_name(client)``: who this identity is (SelfSubjectReview) -> ``NAME`` of ``system:node:NAME``.
- ``PodWatch``: list + watch of the pods bound to the node (``fieldSelector=spec.nodeName=NAME``), from
  the list's resourceVersion; after a dropped watch it resumes from the last version seen, after
  ``410 Gone`` it lists again; errors back off (bounded); it never raises out of ``run``.
- ``pull_secret_auths(client, namespace, names)``: the docker config entries of a pod's
  ``imagePullSecrets`` (the node authorizer lets a node read the secrets its pods reference).
- ``runtime_handler(client, name)``: a RuntimeClass's handler.
- ``set_node_condition(client, node, condition)``: one condition in the Node's status (a strategic
  merge patch of ``nodes/NAME/status``, keyed by ``type``: the kubelet's own conditions and other
  agents' stay; the node authorizer and NodeRestriction let a node do this to its own Node).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from nodeagent.images.credentials import Auth, CredentialError, parse_docker_config
from nodeagent.podpulls.pods import PodInfo, from_api
from nodeagent.util.backoff import Backoff
from nodeagent.util.log import event, get_logger
from nodeagent.util.yamltext import load_mapping

log = get_logger(__name__)

NODE_PREFIX = "system:node:"
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
SECRET_ATTEMPTS = 3  # the node authorizer learns about a new pod's secrets a moment after the pod
SECRET_RETRY_DELAY = 0.5
REQUEST_TIMEOUT = 10.0


class KubeconfigError(Exception):
    """The kubeconfig cannot be used; the message names the file and what is wrong with it."""


class IdentityError(Exception):
    """The kubeconfig's identity is not a node (and ``podPulls.nodeName`` is not set)."""


def load_client(path: Path) -> Any:
    """A lightkube AsyncClient for the kubeconfig at ``path`` (its current context)."""
    import httpx2
    from lightkube import AsyncClient, ConfigError, KubeConfig

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KubeconfigError(f"{path}: not found") from None
    except OSError as e:
        raise KubeconfigError(f"{path}: cannot read: {e.strerror}") from None
    doc = load_mapping(
        text,
        str(path),
        KubeconfigError,
        invalid="not valid YAML",
        not_mapping="not a kubeconfig (expected a mapping)",
    )
    try:
        config = KubeConfig.from_dict(doc, fname=path).get()
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise KubeconfigError(f"{path}: {_safe(e)}") from None
    if config is None:
        raise KubeconfigError(f"{path}: no current context")
    try:
        timeout = httpx2.Timeout(REQUEST_TIMEOUT)
        return AsyncClient(config=config, timeout=timeout, trust_env=False)
    except (ConfigError, OSError, ValueError) as e:  # e.g. a certificate file that does not exist
        raise KubeconfigError(f"{path}: {_safe(e)}") from None


def _safe(e: BaseException) -> str:
    """An exception's text, short, as one line (library messages name fields and files, not values)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


async def node_name(client: Any) -> str:
    """``NAME`` of the identity ``system:node:NAME`` the client authenticates as."""
    from lightkube.resources.authentication_v1 import SelfSubjectReview

    review = await client.create(SelfSubjectReview())
    user = review.status.userInfo.username if review.status and review.status.userInfo else ""
    if not user or not user.startswith(NODE_PREFIX):
        raise IdentityError(
            f"the kubeconfig's identity {user or '(unknown)'!r} is not a node (system:node:NAME); "
            "set podPulls.nodeName"
        )
    return str(user[len(NODE_PREFIX) :])


async def pull_secret_auths(client: Any, namespace: str, names: Sequence[str]) -> list[dict[str, Auth]]:
    """The ``auths`` of each readable pull secret, in the pod's order. A secret that is missing, not
    readable or not a docker config is logged (by name) and left out: the kubelet would try the rest."""
    from lightkube import ApiError
    from lightkube.resources.core_v1 import Secret

    out: list[dict[str, Auth]] = []
    for name in names:
        secret = None
        for attempt in range(SECRET_ATTEMPTS):
            try:
                secret = await client.get(Secret, name, namespace=namespace)
                break
            except ApiError as e:
                code = e.status.code if e.status is not None else 0
                if code == 403 and attempt + 1 < SECRET_ATTEMPTS:
                    await asyncio.sleep(SECRET_RETRY_DELAY)
                    continue
                event(log, "pull secret not readable", level=30, secret=f"{namespace}/{name}", code=code)
                break
        if secret is None:
            continue
        data = secret.data or {}
        key = {"kubernetes.io/dockerconfigjson": ".dockerconfigjson", "kubernetes.io/dockercfg": ".dockercfg"}
        field = key.get(secret.type or "")
        if field is None or field not in data:
            event(log, "pull secret is not a docker config", level=30, secret=f"{namespace}/{name}")
            continue
        source = f"secret {namespace}/{name}"
        try:
            text = base64.b64decode(data[field], validate=True).decode()
            if field == ".dockercfg":  # the old format: the auths map itself
                text = '{"auths": ' + text + "}"
            out.append(parse_docker_config(text, source))
        except (binascii.Error, UnicodeDecodeError):
            event(log, "pull secret is not a docker config", level=30, secret=source)
        except CredentialError as e:
            event(log, "pull secret is not a docker config", level=30, secret=source, error=str(e))
    return out


async def runtime_handler(client: Any, name: str) -> str:
    from lightkube.resources.node_v1 import RuntimeClass

    rc = await client.get(RuntimeClass, name)
    return str(rc.handler or "")


async def set_node_condition(client: Any, node: str, condition: dict[str, str]) -> None:
    from lightkube.resources.core_v1 import Node

    await client.patch(Node.Status, node, {"status": {"conditions": [condition]}})


class PodWatch:
    """List, then watch, the pods bound to ``node``; ``on_pod(PodInfo)`` for each one listed and each
    ADDED/MODIFIED event. ``on_state(connected, error)`` reports the API server's reachability."""

    def __init__(
        self,
        client: Any,
        node: str,
        on_pod: Callable[[PodInfo], None],
        on_state: Callable[[bool, str], None],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.node = node
        self.on_pod = on_pod
        self.on_state = on_state
        self._sleep = sleep
        self._rng = rng
        self.resource_version: str | None = None
        self.lists = 0  # how many times it listed (1 + relists after 410 or a lost version)
        self.watches = 0  # watch requests started

    async def run(self) -> None:
        from lightkube import ApiError

        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX, jitter="equal")
        failures = 0
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                self.on_state(True, "")
                await self._watch()
            except ApiError as e:
                code = e.status.code if e.status is not None else 0
                if code == 410:  # the version is too old: list again, at once
                    event(
                        log,
                        "pod watch expired; listing again",
                        resource_version=self.resource_version,
                        error=_safe(e),
                    )
                    self.resource_version = None
                    continue
                self.on_state(False, f"API server answered {code}: {_safe(e)}")
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as e:  # connection refused, TLS, timeouts, a malformed answer...
                self.on_state(False, _safe(e) if str(e) else type(e).__name__)
            else:
                failures = 0
                continue
            await self._sleep(backoff.delay(failures, self._rng))
            failures += 1

    async def _list(self) -> None:
        from lightkube.resources.core_v1 import Pod

        self.lists += 1
        listing = self.client.list(Pod, namespace="*", fields={"spec.nodeName": self.node})
        pods = [p async for p in listing]
        self.resource_version = listing.resourceVersion
        for p in pods:
            self._deliver(p)

    async def _watch(self) -> None:
        from lightkube.resources.core_v1 import Pod

        self.watches += 1
        async for kind, obj in self.client.watch(
            Pod, namespace="*", fields={"spec.nodeName": self.node}, resource_version=self.resource_version
        ):
            rv = obj.metadata.resourceVersion if obj.metadata is not None else None
            if rv:
                self.resource_version = rv
            if kind in ("ADDED", "MODIFIED"):
                self._deliver(obj)

    def _deliver(self, pod: Any) -> None:
        try:
            info = from_api(pod)
        except Exception:
            log.exception("pod not understood")
            return
        self.on_pod(info)
