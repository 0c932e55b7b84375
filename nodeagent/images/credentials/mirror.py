"""Mirror credentials (``containerd.mirrors.<registry>[i].credentials``): the lookup target of a mirror,
the ``Authorization`` header it gets, and the source the daemon refreshes before expiry."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.images.credentials.auth import Auth, CredentialError
from nodeagent.images.credentials.dockerconfig import DockerConfig, parse_docker_config
from nodeagent.images.credentials.matching import image_for_matching
from nodeagent.images.credentials.plugins import ProviderPlugins
from nodeagent.util.endpoints import strip_scheme

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
