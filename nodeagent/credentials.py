"""Registry credentials for prefetch, from the same sources the kubelet uses (no new secrets).

1. The kubelet's image credential provider plugins (``--image-credential-provider-config`` and
   ``--image-credential-provider-bin-dir``; ECR on EKS works this way): the ``CredentialProviderConfig``
   (``kubelet.config.k8s.io/v1``) lists providers with ``matchImages`` globs; for an image that matches,
   the plugin ``<bin-dir>/<name>`` is executed with ``args`` and ``env``, a ``CredentialProviderRequest``
   on stdin, and answers with a ``CredentialProviderResponse`` on stdout. Its ``auth`` map is keyed by
   match patterns; the answer is cached for ``cacheDuration`` (else the provider's
   ``defaultCacheDuration``) per image, registry or globally (``cacheKeyType``).
2. A docker ``config.json`` (``auths``), as the kubelet reads it.

Matching follows the kubelet (credentialprovider ``URLsMatch``): same number of host labels, each label
a glob (``*`` never crosses a ``.``), the pattern's path a prefix of the image's path, the ports equal.
When several keys match, the most specific (reverse lexical order, as the kubelet walks them) wins.

Secrets never leave this module except inside the returned ``Auth`` (whose ``repr`` hides them): they
are not logged, not put into exceptions, and not written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nodeagent import proc
from nodeagent.durations import parse_duration
from nodeagent.endpoints import strip_scheme
from nodeagent.imageref import DEFAULT_REGISTRY, registry_host, split_reference
from nodeagent.log import event, get_logger
from nodeagent.paths import UnsafePathError, child

log = get_logger(__name__)

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


class CredentialError(Exception):
    """A credential source is misconfigured or a provider failed. Never carries a secret."""


@dataclass(frozen=True)
class Auth:
    """Credentials for one registry; fields as in CRI's AuthConfig. ``repr`` never shows secrets."""

    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)
    # Left empty: containerd then uses the credentials for the registry of the image being pulled
    # (it expects a URL here and drops the credentials when its host differs).
    server_address: str = ""
    source: str = ""  # "provider <name>" or "docker config <path>": safe to print

    def cri_fields(self) -> dict[str, str]:
        """Keyword arguments for runtime.v1.AuthConfig (only the non-empty ones)."""
        d = {
            "username": self.username,
            "password": self.password,
            "auth": self.auth,
            "identity_token": self.identity_token,
            "registry_token": self.registry_token,
            "server_address": self.server_address,
        }
        return {k: v for k, v in d.items() if v}

    def secrets(self) -> list[str]:
        return [s for s in (self.password, self.auth, self.identity_token, self.registry_token) if s]


# --- matching (kubelet semantics) -----------------------------------------------------------------
@dataclass(frozen=True)
class _Url:
    host_parts: tuple[str, ...]
    port: str
    path: str


def _parse_schemeless(text: str) -> _Url:
    hostport, _, path = strip_scheme(text).partition("/")
    host, port = hostport, ""
    if hostport.startswith("["):  # [v6]:port
        end = hostport.find("]")
        host, rest = hostport[: end + 1], hostport[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    return _Url(tuple(host.lower().split(".")), port, "/" + path if path else "")


def _glob_label(pattern: str, label: str) -> bool:
    # filepath.Match: '*' and '?' never match the separator; labels hold no '.' or '/' anyway.
    return fnmatch.fnmatchcase(label, pattern)


def urls_match(pattern: str, target: str) -> bool:
    """The kubelet's URLsMatch on schemeless URLs (pattern may be a glob in the host part)."""
    p, t = _parse_schemeless(pattern), _parse_schemeless(target)
    if p.port != t.port or len(p.host_parts) != len(t.host_parts):
        return False
    if not t.path.startswith(p.path):
        return False
    return all(_glob_label(gp, tp) for gp, tp in zip(p.host_parts, t.host_parts, strict=True))


def image_for_matching(image: str) -> str:
    """The image as the kubelet matches it: registry host first (Docker Hub short names expanded)."""
    host, rest = split_reference(image)
    return f"{host}/{rest}"


def best_match(keys: Sequence[str], image: str) -> str | None:
    """The most specific key matching ``image`` (longer keys and literal keys before wildcards)."""
    return best_match_target(keys, image_for_matching(image))


def best_match_target(keys: Sequence[str], target: str) -> str | None:
    """``best_match`` for a schemeless ``host[:port]/path`` that is already expanded."""
    for key in sorted(keys, reverse=True):
        if urls_match(_fold_docker_hub(key), target):
            return key
    return None


def _fold_docker_hub(key: str) -> str:
    host, sep, path = strip_scheme(key).partition("/")
    if registry_host(host) == DEFAULT_REGISTRY:
        host = DEFAULT_REGISTRY
        if path in ("v1/", "v1", "v2/", "v2"):  # "https://index.docker.io/v1/" means the whole hub
            sep, path = "", ""
    return host + sep + path


# --- the kubelet's CredentialProviderConfig ----------------------------------------------------------
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
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise CredentialError(f"{source}: not valid JSON/YAML{line}") from None
    if not isinstance(doc, dict):
        raise CredentialError(f"{source}: expected a CredentialProviderConfig object")
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


# --- docker config.json ------------------------------------------------------------------------------
def parse_docker_config(text: str, source: str) -> dict[str, Auth]:
    """``auths`` of a docker config.json: key -> Auth (``auth`` is base64 ``user:password``)."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise CredentialError(f"{source}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise CredentialError(f"{source}: expected an object")
    raw = doc.get("auths", {})
    if not isinstance(raw, dict):
        raise CredentialError(f"{source}: auths: must be an object")
    out: dict[str, Auth] = {}
    for key, val in raw.items():
        if not isinstance(val, dict):
            raise CredentialError(f"{source}: auths: entry {len(out)} is not an object")
        user, pw = str(val.get("username") or ""), str(val.get("password") or "")
        encoded = val.get("auth")
        if encoded and not (user or pw):
            try:
                decoded = base64.b64decode(str(encoded), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise CredentialError(f"{source}: auths: entry {len(out)}: auth is not base64") from None
            user, sep, pw = decoded.partition(":")
            if not sep:
                raise CredentialError(f"{source}: auths: entry {len(out)}: auth is not user:password")
        out[str(key)] = Auth(
            username=user,
            password=pw,
            identity_token=str(val.get("identitytoken") or ""),
            registry_token=str(val.get("registrytoken") or ""),
            source=f"docker config {source}",
        )
    return out


class DockerConfig:
    def __init__(self, auths: Mapping[str, Auth]) -> None:
        self.auths = dict(auths)

    @classmethod
    def from_file(cls, path: Path) -> DockerConfig:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls({})
        except OSError as e:
            raise CredentialError(f"{path}: cannot read: {e.strerror}") from None
        return cls(parse_docker_config(text, str(path)))

    def lookup(self, image: str) -> Auth | None:
        key = best_match(list(self.auths), image)
        return self.auths[key] if key is not None else None

    def lookup_target(self, target: str) -> Auth | None:
        key = best_match_target(list(self.auths), target)
        return self.auths[key] if key is not None else None


class Credentials:
    """All credential sources, in the kubelet's order: provider plugins, then docker config."""

    def __init__(self, plugins: ProviderPlugins | None = None, docker: DockerConfig | None = None) -> None:
        self.plugins = plugins
        self.docker = docker

    @classmethod
    def from_config(cls, paths: Any, images_config: Any, **plugin_kw: Any) -> Credentials:
        """From ``images.credentialProviderConfig``/``credentialProviderBinDir``/``dockerConfig``,
        all under ``paths.root``."""
        plugins = ProviderPlugins.from_files(
            paths.host(images_config.credential_provider_config),
            paths.host(images_config.credential_provider_bin_dir),
            **plugin_kw,
        )
        docker = DockerConfig.from_file(paths.host(images_config.docker_config))
        return cls(plugins, docker)

    def lookup(self, image: str) -> Auth | None:
        """Credentials for ``image`` or None (anonymous). Raises CredentialError (no secret inside)."""
        if self.plugins is not None:
            found = self.plugins.lookup(image)
            if found is not None:
                return found
        if self.docker is not None:
            found = self.docker.lookup(image)
            if found is not None:
                return found
        return None

    def forget(self, image: str) -> None:
        if self.plugins is not None:
            self.plugins.forget(image)


# --- mirror credentials (containerd.mirrors.<registry>[i].credentials) -------------------------------
# A provider answer without a cacheDuration of its own and a default of 0 ("do not cache") is
# fetched again this often; a file or docker config is re-read when it changes.
UNCACHED_REFRESH = 300.0


def mirror_target(endpoint: str) -> str:
    """The schemeless ``host[:port]/path`` credentials are looked up for: the mirror's host and its
    path without the registry API root (``https://1111.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub``
    -> ``1111.dkr.ecr.us-west-2.amazonaws.com/docker-hub``)."""
    hostport, _, path = strip_scheme(endpoint).partition("/")
    hostport = hostport.rpartition("@")[2]
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["v2"]:
        parts = parts[1:]
    return "/".join([hostport.lower(), *parts])


def authorization(auth: Auth) -> str:
    """The ``Authorization`` header value for ``auth``, as a registry client sends it without a
    challenge: Basic for username/password (or docker config ``auth``), Bearer for a registry token."""
    if auth.registry_token:
        return f"Bearer {auth.registry_token}"
    if auth.username or auth.password:
        return "Basic " + base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
    if auth.auth:
        return f"Basic {auth.auth}"
    if auth.identity_token:
        raise CredentialError(f"{auth.source}: an identity token cannot be sent as a header")
    raise CredentialError(f"{auth.source}: no username, password or token")


@dataclass(frozen=True)
class MirrorAuth:
    """One credential for one mirror. ``header`` is a secret: never printed (``repr`` hides it)."""

    header: str = field(repr=False)
    obtained: float  # clock time
    lifetime: float | None  # seconds the source vouches for it; None: until the source changes
    source: str  # safe to print: "provider ecr-credential-provider", "file /etc/..."
    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file it came from

    def expires(self) -> float | None:
        return None if self.lifetime is None else self.obtained + self.lifetime

    def refresh_at(self) -> float | None:
        """Fetch again at half the lifetime: a pull that started with this value still finishes with
        it (containerd reads hosts.toml once per pull), long before it expires."""
        return None if self.lifetime is None else self.obtained + self.lifetime / 2


class MirrorCredentialSource:
    """Gets the ``Authorization`` value of one mirror from its configured source.

    ``fetch`` runs the kubelet's credential provider plugins (a fresh answer, not the prefetch
    cache), reads a docker config.json or a ``username:password`` file. Errors are CredentialError
    without a secret inside."""

    def __init__(
        self,
        endpoint: str,
        source: str,
        *,
        image: str = "",
        path: Path | None = None,
        plugins: Callable[[], ProviderPlugins] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.kind = source
        self.target = image_for_matching(image) if image else mirror_target(endpoint)
        self.path = path
        self._plugins = plugins
        self._clock = clock

    def describe(self) -> str:
        if self.kind == "provider":
            return f"credential provider for {self.target}"
        return f"{'docker config' if self.kind == 'dockerConfig' else 'file'} {self.path}"

    def _stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def changed_since(self, auth: MirrorAuth) -> bool:
        """A file source whose file changed since ``auth`` was read from it."""
        return self.kind != "provider" and self._stamp() != auth.stamp

    def refresh_due(self, auth: MirrorAuth | None, now: float) -> bool:
        if auth is None:
            return True
        at = auth.refresh_at()
        if at is not None:
            return now >= at
        return self.changed_since(auth)

    def fetch(self) -> MirrorAuth:
        now = self._clock()
        if self.kind == "provider":
            if self._plugins is None:
                raise CredentialError("no credential provider configuration")
            plugins = self._plugins()
            if not plugins.providers:
                raise CredentialError(
                    "no credential provider plugins (images.credentialProviderConfig: missing or empty)"
                )
            found = plugins.fetch_target(self.target)
            if found is None:
                raise CredentialError(f"no credential provider matches {self.target}")
            auth, ttl = found
            lifetime = ttl if ttl > 0 else None
            mauth = MirrorAuth(authorization(auth), now, lifetime, auth.source)
            if lifetime is None:  # "do not cache": fetch again regularly
                mauth = MirrorAuth(mauth.header, now, UNCACHED_REFRESH * 2, auth.source)
            return mauth
        assert self.path is not None
        stamp = self._stamp()
        if self.kind == "dockerConfig":
            try:
                text = self.path.read_text()
            except OSError as e:
                raise CredentialError(f"{self.path}: cannot read: {e.strerror}") from None
            found_auth = DockerConfig(parse_docker_config(text, str(self.path))).lookup_target(self.target)
            if found_auth is None:
                raise CredentialError(f"{self.path}: no auths entry matches {self.target}")
            return MirrorAuth(authorization(found_auth), now, None, f"docker config {self.path}", stamp)
        try:
            text = self.path.read_text()
        except OSError as e:
            raise CredentialError(f"{self.path}: cannot read: {e.strerror}") from None
        line = text.strip()
        user, sep, password = line.partition(":")
        if not sep or not user or "\n" in line:
            raise CredentialError(f"{self.path}: expected one line username:password")
        value = authorization(Auth(username=user, password=password, source=f"file {self.path}"))
        return MirrorAuth(value, now, None, f"file {self.path}", stamp)
