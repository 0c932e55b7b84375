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

The package: ``auth`` (``Auth``, ``CredentialError``), ``matching`` (kubelet matching rules),
``plugins`` (credential provider plugins), ``dockerconfig`` (docker config.json), ``mirror`` (mirror
credentials for hosts.toml); ``Credentials`` here puts plugins and docker config together in the
kubelet's order.
"""

from __future__ import annotations

from typing import Any

from nodeagent.images.credentials.auth import Auth, CredentialError
from nodeagent.images.credentials.dockerconfig import DockerConfig, parse_docker_config
from nodeagent.images.credentials.matching import (
    best_match,
    best_match_target,
    image_for_matching,
    urls_match,
)
from nodeagent.images.credentials.mirror import (
    UNCACHED_REFRESH,
    MirrorAuth,
    MirrorCredentialSource,
    authorization,
    mirror_target,
)
from nodeagent.images.credentials.plugins import (
    PROVIDER_TIMEOUT,
    Provider,
    ProviderPlugins,
    parse_provider_config,
    parse_provider_response,
)

__all__ = [
    "PROVIDER_TIMEOUT",
    "UNCACHED_REFRESH",
    "Auth",
    "CredentialError",
    "Credentials",
    "DockerConfig",
    "MirrorAuth",
    "MirrorCredentialSource",
    "Provider",
    "ProviderPlugins",
    "authorization",
    "best_match",
    "best_match_target",
    "image_for_matching",
    "mirror_target",
    "parse_docker_config",
    "parse_provider_config",
    "parse_provider_response",
    "urls_match",
]


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
