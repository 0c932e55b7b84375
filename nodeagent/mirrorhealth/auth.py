"""Mirror credentials: from ``containerd.mirrors.<registry>[i].credentials`` to the ``Authorization``
header of that mirror's ``[host]`` section of hosts.toml.

containerd sends a ``[host."..."].header`` on every request to that host, and also to the token
realm when the host answers with a Bearer challenge (``docker.WithAuthHeader``); it reads hosts.toml
once per pull, so a rewritten file takes effect at the next pull and a pull in flight keeps the value
it started with. The credentials the kubelet passes with a PullImage are for the image's own
registry and do not reach a mirror on another host (the ECR provider does not even match a
``docker.io`` image), which is why a mirror that needs credentials needs them here.

The header value is a secret: it lives in memory and in the hosts.toml files (mode 0600), never in
a log line, a metric, the status file, a diff (masked) or an error message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from nodeagent.config.model import Config, Mirror
from nodeagent.images.credentials import MirrorCredentialSource, ProviderPlugins
from nodeagent.util.paths import Paths

AUTH_HEADER = "Authorization"
# one provider plugin run for a mirror, at apply time (the boot path: well below the unit's start
# timeout) and in the daemon (a hung plugin holds only that mirror's probe loop, this long)
PROVIDER_TIMEOUT = 15.0


def with_authorization(mirror: Mirror, value: str) -> Mirror:
    """``mirror`` with ``Authorization: value`` as its only Authorization header."""
    header = tuple((n, v) for n, v in mirror.header if n.lower() != AUTH_HEADER.lower())
    return dataclasses.replace(mirror, header=(*header, (AUTH_HEADER, (value,))))


def source_for(
    config: Config, paths: Paths, mirror: Mirror, *, timeout: float = PROVIDER_TIMEOUT
) -> MirrorCredentialSource | None:
    """The credential source of ``mirror`` (None when it has no ``credentials``)."""
    c = mirror.credentials
    if c is None:
        return None
    images = config.images

    def plugins() -> ProviderPlugins:
        config_file = paths.host(images.credential_provider_config)
        bin_dir = paths.host(images.credential_provider_bin_dir)
        return ProviderPlugins.from_files(config_file, bin_dir, timeout=timeout)

    path = None
    if c.source == "dockerConfig":
        path = paths.host(c.path or images.docker_config)
    elif c.source == "file" and c.path:
        path = paths.host(c.path)
    return MirrorCredentialSource(mirror.endpoint, c.source, image=c.image or "", path=path, plugins=plugins)


SourceFor = Callable[[Mirror], MirrorCredentialSource | None]
