"""Registry credentials as the kubelet hands them over (``Auth``, secrets hidden from ``repr``), and the
one error every credential source raises."""

from __future__ import annotations

from dataclasses import dataclass, field


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
