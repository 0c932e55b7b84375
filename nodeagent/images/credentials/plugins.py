"""The kubelet's image credential provider plugins: ``CredentialProviderConfig`` parsing, the exec
protocol (``CredentialProviderRequest``/``Response``) and the answer cache per image, registry or
globally (``cacheKeyType``)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.images.credentials.auth import Auth, CredentialError
from nodeagent.images.credentials.matching import (
    best_match,
    best_match_target,
    image_for_matching,
    urls_match,
)
from nodeagent.util import proc
from nodeagent.util.durations import parse_duration
from nodeagent.util.imageref import split_reference
from nodeagent.util.log import event, get_logger
from nodeagent.util.paths import UnsafePathError, child
from nodeagent.util.yamltext import load_mapping

CONFIG_API_VERSIONS = (
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
)
PROVIDER_API_VERSIONS = (
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
)
CACHE_KEY_TYPES = ("Image", "Registry", "Global")
PROVIDER_TIMEOUT = 60.0  # seconds for one plugin run
MAX_RESPONSE_BYTES = 1 << 20
MAX_CACHE_ENTRIES = 1024

log = get_logger("nodeagent.images.credentials")  # the name its log lines always had


@dataclass(frozen=True)
class Provider:
    name: str
    match_images: tuple[str, ...]
    default_cache_duration: float
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def matches(self, image: str) -> bool:
        return self.matches_target(image_for_matching(image))

    def matches_target(self, target: str) -> bool:
        return any(urls_match(p, target) for p in self.match_images)


def _problem(source: str, where: str, message: str) -> CredentialError:
    return CredentialError(f"{source}: {where}: {message}")


def parse_provider_config(text: str, source: str) -> tuple[Provider, ...]:
    """Parse and check a CredentialProviderConfig (JSON or YAML, as the kubelet accepts)."""
    doc = load_mapping(
        text,
        source,
        CredentialError,
        invalid="not valid JSON/YAML",
        not_mapping="expected a CredentialProviderConfig object",
    )
    if doc.get("kind") != "CredentialProviderConfig":
        raise _problem(source, "kind", f"must be 'CredentialProviderConfig', got {doc.get('kind')!r}")
    if doc.get("apiVersion") not in CONFIG_API_VERSIONS:
        raise _problem(source, "apiVersion", f"unsupported {doc.get('apiVersion')!r}")
    raw = doc.get("providers")
    if not isinstance(raw, list) or not raw:
        raise _problem(source, "providers", "must be a non-empty list")
    out: list[Provider] = []
    seen: set[str] = set()
    for i, p in enumerate(raw):
        at = f"providers[{i}]"
        if not isinstance(p, dict):
            raise _problem(source, at, "must be an object")
        name = p.get("name")
        if not isinstance(name, str) or not name:
            raise _problem(source, f"{at}.name", "required")
        if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or " " in name:
            raise _problem(source, f"{at}.name", f"{name!r} is not a plain file name")
        if name in seen:
            raise _problem(source, f"{at}.name", f"duplicate provider {name!r}")
        seen.add(name)
        match = p.get("matchImages")
        if not isinstance(match, list) or not match or not all(isinstance(m, str) and m for m in match):
            raise _problem(source, f"{at}.matchImages", "must be a non-empty list of strings")
        dur_text = p.get("defaultCacheDuration")
        dur = parse_duration(dur_text) if isinstance(dur_text, str) else None
        if dur is None or dur < 0:
            raise _problem(source, f"{at}.defaultCacheDuration", f"required duration, got {dur_text!r}")
        api = p.get("apiVersion")
        if api not in PROVIDER_API_VERSIONS:
            raise _problem(source, f"{at}.apiVersion", f"unsupported {api!r}")
        args = p.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise _problem(source, f"{at}.args", "must be a list of strings")
        env_raw = p.get("env") or []
        env: list[tuple[str, str]] = []
        if not isinstance(env_raw, list):
            raise _problem(source, f"{at}.env", "must be a list of {name, value}")
        for j, var in enumerate(env_raw):
            if not isinstance(var, dict) or not isinstance(var.get("name"), str) or not var["name"]:
                raise _problem(source, f"{at}.env[{j}].name", "required")
            value = var.get("value", "")
            env.append((var["name"], value if isinstance(value, str) else str(value)))
        if p.get("tokenAttributes") is not None:
            # Service-account-token providers need a pod's token: nothing a node-level pull can give.
            event(
                log, "credential provider needs a service account token; not used by nodeagent", provider=name
            )
            continue
        out.append(Provider(name, tuple(match), float(dur), str(api), tuple(args), tuple(env)))
    return tuple(out)


def parse_provider_response(data: bytes, provider: Provider) -> tuple[str, float | None, dict[str, Auth]]:
    """``(cacheKeyType, cacheDuration or None, auth by match key)`` from a plugin's stdout."""
    where = f"credential provider {provider.name}"
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CredentialError(f"{where}: response is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != "CredentialProviderResponse":
        raise CredentialError(f"{where}: response kind must be CredentialProviderResponse")
    if doc.get("apiVersion") != provider.api_version:
        raise CredentialError(
            f"{where}: response apiVersion {doc.get('apiVersion')!r} differs from {provider.api_version!r}"
        )
    key_type = doc.get("cacheKeyType")
    if key_type not in CACHE_KEY_TYPES:
        raise CredentialError(f"{where}: cacheKeyType must be one of {', '.join(CACHE_KEY_TYPES)}")
    duration: float | None = None
    if doc.get("cacheDuration") not in (None, ""):
        d = parse_duration(str(doc["cacheDuration"]))
        if d is None or d < 0:
            raise CredentialError(f"{where}: cacheDuration is not a duration")
        duration = d
    auths: dict[str, Auth] = {}
    raw = doc.get("auth") or {}
    if not isinstance(raw, dict):
        raise CredentialError(f"{where}: auth must be an object")
    for key, val in raw.items():
        if not isinstance(val, dict):
            raise CredentialError(f"{where}: auth entry must be an object")  # the key may be fine to name
        user, pw = val.get("username", ""), val.get("password", "")
        if not isinstance(user, str) or not isinstance(pw, str):
            raise CredentialError(f"{where}: auth username/password must be strings")
        auths[str(key)] = Auth(username=user, password=pw, source=f"provider {provider.name}")
    return str(key_type), duration, auths


@dataclass
class _CacheEntry:
    expires: float
    auths: dict[str, Auth]


class ProviderPlugins:
    """Runs the kubelet's credential provider plugins and caches their answers."""

    def __init__(
        self,
        providers: Sequence[Provider],
        bin_dir: Path,
        *,
        run: Callable[..., proc.Result] = proc.run,
        clock: Callable[[], float] = time.monotonic,
        base_env: Mapping[str, str] | None = None,
        timeout: float = PROVIDER_TIMEOUT,
    ) -> None:
        self.providers = tuple(providers)
        self.bin_dir = bin_dir
        self._run = run
        self._clock = clock
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._timeout = timeout
        self._cache: dict[tuple[str, str, str], _CacheEntry] = {}
        self._lock = threading.Lock()
        self.executions = 0  # plugin runs (for tests and status; never per-image detail)

    @classmethod
    def from_files(cls, config_path: Path, bin_dir: Path, **kw: Any) -> ProviderPlugins:
        """Read the config; a missing file means no providers (not every node has one)."""
        try:
            text = config_path.read_text()
        except FileNotFoundError:
            return cls((), bin_dir, **kw)
        except OSError as e:
            raise CredentialError(f"{config_path}: cannot read: {e.strerror}") from None
        return cls(parse_provider_config(text, str(config_path)), bin_dir, **kw)

    def _cache_key(self, provider: Provider, key_type: str, image: str) -> tuple[str, str, str]:
        if key_type == "Image":
            return (provider.name, key_type, image)
        if key_type == "Registry":
            return (provider.name, key_type, split_reference(image)[0])
        return (provider.name, key_type, "")

    def _cached(self, provider: Provider, image: str) -> dict[str, Auth] | None:
        now = self._clock()
        for key_type in CACHE_KEY_TYPES:
            entry = self._cache.get(self._cache_key(provider, key_type, image))
            if entry is not None:
                if entry.expires > now:
                    return entry.auths
                del self._cache[self._cache_key(provider, key_type, image)]
        return None

    def _exec(self, provider: Provider, image: str) -> dict[str, Auth]:
        return self._exec_ttl(provider, image)[0]

    def _exec_ttl(self, provider: Provider, image: str) -> tuple[dict[str, Auth], float]:
        """Run the plugin; its answer and how long it may be used (cacheDuration or the default)."""
        try:
            exe = child(self.bin_dir, provider.name)
        except UnsafePathError as e:
            raise CredentialError(f"credential provider {provider.name}: {e}") from None
        request = json.dumps(
            {"apiVersion": provider.api_version, "kind": "CredentialProviderRequest", "image": image}
        ).encode()
        env = dict(self._base_env)
        env.update(provider.env)
        self.executions += 1
        try:
            res = self._run(
                [str(exe), *provider.args], timeout=self._timeout, stdin=request, env=env, check=False
            )
        except proc.CommandError as e:
            raise CredentialError(f"credential provider {provider.name}: {e}") from None
        if res.returncode != 0:
            # stderr is not shown: a failing plugin may print what it was given or got.
            raise CredentialError(f"credential provider {provider.name}: exit {res.returncode}")
        if len(res.stdout) > MAX_RESPONSE_BYTES:
            raise CredentialError(f"credential provider {provider.name}: response too large")
        key_type, duration, auths = parse_provider_response(res.stdout, provider)
        ttl = provider.default_cache_duration if duration is None else duration
        if ttl > 0:
            with self._lock:
                if len(self._cache) >= MAX_CACHE_ENTRIES:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[self._cache_key(provider, key_type, image)] = _CacheEntry(
                    self._clock() + ttl, auths
                )
        return auths, ttl

    def fetch_target(self, target: str) -> tuple[Auth, float] | None:
        """Fresh credentials for a schemeless ``host[:port]/path`` (a mirror), never from the cache:
        ``(auth, lifetime in seconds)`` from the first provider that matches and answers for it, or
        None when no provider matches. Raises CredentialError (no secret inside)."""
        for provider in self.providers:
            if not provider.matches_target(target):
                continue
            auths, ttl = self._exec_ttl(provider, target)
            key = best_match_target(list(auths), target)
            if key is not None:
                return auths[key], ttl
        return None

    def lookup(self, image: str) -> Auth | None:
        """Credentials for ``image`` from the first matching provider that has a matching auth key
        (providers earlier in the config win, as in the kubelet)."""
        for provider in self.providers:
            if not provider.matches(image):
                continue
            with self._lock:
                auths = self._cached(provider, image)
            if auths is None:
                auths = self._exec(provider, image)
            key = best_match(list(auths), image)
            if key is not None:
                return auths[key]
        return None

    def forget(self, image: str) -> None:
        """Drop cached answers that apply to ``image`` (after the registry refused them)."""
        with self._lock:
            for provider in self.providers:
                for key_type in CACHE_KEY_TYPES:
                    self._cache.pop(self._cache_key(provider, key_type, image), None)
