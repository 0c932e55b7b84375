"""Rewrite one registry's hosts.toml with only the mirrors that are up.

The content comes from the same pure renderer ``apply`` uses (``nodeagent.apply.targets.mirrors``), fed
the configured mirrors minus the ones that are down, so the result is exactly what ``apply`` would
have written without them: ``server`` stays, the other mirrors keep their order and settings.
Only a file that carries nodeagent's ownership marker is ever rewritten (a hosts.toml an operator
or another tool wrote is left alone), and every write goes through ``atomicio.write_atomic``
(containerd reads the file per pull and must never see half of it). The file mode is kept.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

from nodeagent.apply.targets import TargetError
from nodeagent.apply.targets import mirrors as mirrors_target
from nodeagent.config.model import ContainerdConfig, Mirror
from nodeagent.util.atomicio import read_bytes_or_none, write_atomic
from nodeagent.util.paths import Paths, UnsafePathError

Render = Callable[[str, tuple[Mirror, ...]], str]


class NotOwnedError(Exception):
    """The registry's hosts.toml is missing or was not written by nodeagent."""


def _normalize(endpoint: str) -> str:
    return endpoint.rstrip("/")


class HostsFileWriter:
    def __init__(
        self,
        paths: Paths,
        containerd: ContainerdConfig,
        *,
        render: Render | None = None,
        is_owned: Callable[[str], bool] | None = None,
        file_of: Callable[[str], Path] | None = None,
    ) -> None:
        self.paths = paths
        self.containerd = containerd
        self._render = render
        self._is_owned = is_owned
        self._file_of = file_of

    # The defaults are the apply target's own (one renderer, one marker, one path rule).
    def _renderer(self) -> Render:
        if self._render is not None:
            return self._render
        cd = self.containerd

        def render(registry: str, active: tuple[Mirror, ...]) -> str:
            return mirrors_target.render_hosts_toml(registry, active, mirror_only=cd.is_mirror_only(registry))

        return render

    def owned(self, text: str) -> bool:
        return (self._is_owned or mirrors_target.is_owned)(text)

    def path(self, registry: str) -> Path:
        if self._file_of is not None:
            return self._file_of(registry)
        try:
            return mirrors_target.hosts_toml_path(self.paths, self.containerd.hosts_dir, registry)
        except TargetError as e:
            raise UnsafePathError(str(e)) from None

    def _owned_text(self, registry: str) -> tuple[Path, str]:
        try:
            path = self.path(registry)
        except UnsafePathError as e:
            raise NotOwnedError(str(e)) from None
        data = read_bytes_or_none(path)
        if data is None:
            raise NotOwnedError(f"{path}: missing (nodeagent apply did not write it)")
        text = data.decode("utf-8", "replace")
        if not self.owned(text):
            raise NotOwnedError(f"{path}: no nodeagent ownership marker")
        return path, text

    def endpoints_in_file(self, registry: str) -> frozenset[str] | None:
        try:
            path, text = self._owned_text(registry)
        except NotOwnedError:
            return None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
        hosts = doc.get("host", {})
        found = {_normalize(k) for k in hosts} if isinstance(hosts, dict) else set()
        server = doc.get("server")
        if self.containerd.is_mirror_only(registry) and isinstance(server, str):
            found.add(_normalize(server))  # a mirror-only registry's last mirror is its server
        return frozenset(found)

    def write(self, registry: str, active: tuple[Mirror, ...]) -> bool:
        """Rewrite the file with ``active`` (mirrors with their credentials' headers); a file that
        holds a header (a token) is mode 0600 whatever it was, else its mode is kept."""
        path, _ = self._owned_text(registry)
        mode = path.stat().st_mode & 0o7777
        if mirrors_target.has_headers(active):
            mode = 0o600
        return write_atomic(path, self._renderer()(registry, active), mode=mode)
