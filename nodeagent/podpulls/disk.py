"""Disk-aware pod pulls: an image whose pull would leave the image filesystem above eviction's high
threshold, with eviction unable to bring it back, is not pulled ahead (the kubelet still pulls it when
its container starts, and the kubelet's own image GC and eviction decide then).

The image's size is read from its registry before the pull: the manifest (for an index, the one for
this node's platform) lists the compressed size of every layer. On disk an image costs about twice
that (content store + unpacked snapshot, docs/eviction.md), which is the estimate used. The registry
endpoint is the ``server`` of the registry's hosts.toml (``containerd.hostsDir``), else
``https://HOST`` (``registry-1.docker.io`` for Docker Hub); credentials are the pull's own (Basic, or
a Bearer token from the registry's token service). When the size cannot be learned the pull goes
ahead: refusing every pull when a registry is slow would be worse than the risk.

What eviction could free comes from its own plan (``nodeagent.eviction``) computed as if the disk
were full: the bytes of every image it would be allowed to remove (not in use, pinned, baked,
protected or too recent). Pulls of pods in progress are counted as already on disk.
"""

from __future__ import annotations

import asyncio
import platform
import tomllib
from pathlib import Path
from typing import Any

from nodeagent.util import humanize
from nodeagent.util.endpoints import without_trailing_slash
from nodeagent.util.imageref import normalize, split_domain
from nodeagent.util.log import event, get_logger

log = get_logger(__name__)

DISK_FACTOR = 2.0  # bytes on disk per compressed byte (content store + unpacked snapshot)
REGISTRY_TIMEOUT = 5.0
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
MAX_MANIFEST_BYTES = 4 << 20


class SizeUnknown(Exception):
    """The registry did not tell (the message says why; it never carries credentials)."""


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def registry_base(host: str, hosts_dir: Path) -> str:
    """The URL containerd would pull ``host`` from (``server`` of its hosts.toml), without mirrors."""
    try:
        doc = tomllib.loads((hosts_dir / host / "hosts.toml").read_text())
        server = doc.get("server")
        if isinstance(server, str) and server:
            return without_trailing_slash(server)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        pass
    if host == "docker.io":
        return "https://registry-1.docker.io"
    return f"https://{host}"


async def compressed_size(image: str, auth: Any, hosts_dir: Path, *, client: Any = None) -> int:
    """Config + layer bytes of ``image`` for this node's platform, from its registry."""
    import httpx2

    ref = normalize(image)
    host, rest = split_domain(ref)
    name, at, digest = rest.partition("@")
    if at:
        reference = digest
    else:
        name, _, reference = name.rpartition(":")
    base = registry_base(host, hosts_dir)
    own = client is None
    http = client or httpx2.AsyncClient(timeout=REGISTRY_TIMEOUT, follow_redirects=True, trust_env=False)
    try:
        token: list[str] = []
        doc = await _manifest(http, base, name, reference, auth, token)
        if "manifests" in doc:  # an index: this platform's manifest
            want = next(
                (
                    m
                    for m in doc["manifests"]
                    if (m.get("platform") or {}).get("os") == "linux"
                    and (m.get("platform") or {}).get("architecture") == _arch()
                ),
                None,
            )
            if want is None:
                raise SizeUnknown(f"{image}: no manifest for linux/{_arch()}")
            doc = await _manifest(http, base, name, want["digest"], auth, token)
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise SizeUnknown(f"{image}: manifest without layers")
        return int((doc.get("config") or {}).get("size", 0)) + sum(int(x.get("size", 0)) for x in layers)
    except httpx2.HTTPError as e:
        raise SizeUnknown(f"{image}: registry {host}: {type(e).__name__}") from None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise SizeUnknown(f"{image}: registry {host}: malformed manifest") from None
    finally:
        if own:
            await http.aclose()


def _basic(auth: Any) -> tuple[str, str] | None:
    if auth is not None and auth.username and auth.password:
        return (auth.username, auth.password)
    return None


async def _manifest(http: Any, base: str, name: str, reference: str, auth: Any, token: list[str]) -> Any:
    url = f"{base}/v2/{name}/manifests/{reference}"
    headers = {"Accept": MANIFEST_TYPES}
    if token:
        headers["Authorization"] = f"Bearer {token[0]}"
        resp = await http.get(url, headers=headers)
    else:
        resp = await http.get(url, headers=headers, auth=_basic(auth))
        if resp.status_code == 401 and resp.headers.get("www-authenticate", "").lower().startswith("bearer"):
            token.append(await _token(http, resp.headers["www-authenticate"], auth))
            headers["Authorization"] = f"Bearer {token[0]}"
            resp = await http.get(url, headers=headers)
    if resp.status_code != 200:
        raise SizeUnknown(f"{name}:{reference}: registry answered {resp.status_code}")
    if len(resp.content) > MAX_MANIFEST_BYTES:
        raise SizeUnknown(f"{name}:{reference}: manifest too large")
    return resp.json()


async def _token(http: Any, challenge: str, auth: Any) -> str:
    params: dict[str, str] = {}
    for part in challenge[len("bearer ") :].split(","):
        k, _, v = part.strip().partition("=")
        params[k.strip()] = v.strip().strip('"')
    realm = params.pop("realm", "")
    if not realm:
        raise SizeUnknown("registry token service without a realm")
    resp = await http.get(realm, params=params, auth=_basic(auth))
    if resp.status_code != 200:
        raise SizeUnknown(f"registry token service answered {resp.status_code}")
    doc = resp.json()
    tok = doc.get("token") or doc.get("access_token")
    if not isinstance(tok, str) or not tok:
        raise SizeUnknown("registry token service gave no token")
    return tok


class DiskGuard:
    """``check(image, auth)`` -> a reason to skip the pull, or None. ``evictor`` is the daemon's
    ``EvictionLoop`` (its measure and plan); without one, eviction frees nothing."""

    def __init__(self, evictor: Any, hosts_dir: Path, *, factor: float = DISK_FACTOR) -> None:
        self.evictor = evictor
        self.hosts_dir = hosts_dir
        self.factor = factor
        self._reserved: dict[int, int] = {}  # admission ticket -> estimated bytes, while its pull runs
        self._next = 0
        self._http: Any = None  # one HTTP client for every size lookup (made on first use)
        self._plan: asyncio.Future[Any] | None = None  # the plan being made, shared by the checks

    @property
    def reserved(self) -> int:
        return sum(self._reserved.values())

    def _client(self) -> Any:
        if self._http is None:
            import httpx2

            self._http = httpx2.AsyncClient(timeout=REGISTRY_TIMEOUT, follow_redirects=True, trust_env=False)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    async def _current_plan(self) -> Any:
        """Eviction's plan as if the disk were full. The checks of a pod's images arrive together:
        they share the one being made instead of each making its own, one after the other."""
        plan = self._plan
        if plan is None or plan.done():
            plan = self._plan = asyncio.ensure_future(self.evictor.make_plan_if_full())
        return await asyncio.shield(plan)

    async def check(self, image: str, auth: Any) -> tuple[str | None, int | None]:
        """``(reason to skip, None)`` or ``(None, ticket)``; ``done(ticket)`` once the pull ended
        (a ticket of None needs nothing)."""
        try:
            compressed = await compressed_size(image, auth, self.hosts_dir, client=self._client())
        except SizeUnknown as e:
            event(log, "image size unknown; pulling anyway", image=image, error=str(e))
            return None, None
        size = int(compressed * self.factor)
        try:
            plan = await self._current_plan()
        except Exception as e:
            event(log, "imagefs usage unknown; pulling anyway", image=image, error=str(e)[:300])
            return None, None
        # from here to the admission nothing awaits: each admission sees the others' reservations
        fs = plan.usage
        high = plan.high_bytes
        after = fs.used_bytes + self.reserved + size
        freeable = plan.removal_bytes
        if after < high or (after < fs.total_bytes and after - freeable < high):
            return None, self._admit(size)
        pct = 100.0 * after / fs.total_bytes if fs.total_bytes else 100.0
        return (
            f"needs ~{humanize.size(size)}: the image filesystem would reach {pct:.0f}% "
            f"(eviction high {plan.thresholds.high_percent}%) and eviction can free only "
            f"{humanize.size(freeable)}"
        ), None

    def _admit(self, size: int) -> int:
        self._next += 1
        self._reserved[self._next] = size
        return self._next

    def done(self, ticket: int | None) -> None:
        if ticket is not None:
            self._reserved.pop(ticket, None)
