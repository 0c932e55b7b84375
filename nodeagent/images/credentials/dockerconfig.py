"""A docker ``config.json`` (``auths``), read as the kubelet reads it."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path

from nodeagent.images.credentials.auth import Auth, CredentialError
from nodeagent.images.credentials.matching import best_match, best_match_target


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
