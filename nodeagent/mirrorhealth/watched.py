"""One mirror as the mirror health worker tracks it, and what it writes hosts.toml through."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nodeagent.config.model import Mirror
from nodeagent.images.credentials import MirrorAuth, MirrorCredentialSource
from nodeagent.mirrorhealth import probe as probes
from nodeagent.mirrorhealth.state import MirrorState


class HostsWriter(Protocol):
    """Rewrites one registry's hosts.toml (implemented by ``failover.HostsFileWriter``)."""

    def endpoints_in_file(self, registry: str) -> frozenset[str] | None:
        """Mirror endpoints the registry's file lists now; None if nodeagent does not own it."""

    def write(self, registry: str, active: tuple[Mirror, ...]) -> bool:
        """Write the file with ``active`` mirrors only; True if it changed. Raises
        ``NotOwnedError`` (file not written by nodeagent) or ``OSError``."""


@dataclass
class WatchedMirror:
    registry: str
    mirror: Mirror
    target: probes.ProbeTarget
    state: MirrorState
    label: str  # endpoint without userinfo: safe for labels, logs and status
    in_file: bool = True
    last: probes.ProbeResult | None = None
    last_probe_wall: float | None = None
    last_change_wall: float | None = None
    source: MirrorCredentialSource | None = None  # its credentials, when configured
    auth: MirrorAuth | None = None  # the current credential (a secret: never logged)
    auth_error: str = ""  # why the last fetch failed (no secret inside)
    auth_wall: float | None = None  # when the current credential was fetched
    auth_refreshes: int = 0
    make: Callable[[Mirror], probes.ProbeTarget] | None = None

    def written(self) -> Mirror:
        """The mirror as hosts.toml gets it: with its credentials' Authorization header."""
        if self.auth is None:
            return self.mirror
        from nodeagent.mirrorhealth.auth import with_authorization

        return with_authorization(self.mirror, self.auth.header)

    def writable(self) -> bool:
        return self.source is None or self.auth is not None
