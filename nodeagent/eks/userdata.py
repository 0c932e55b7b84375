"""EC2 user-data: find nodeagent's part in it, and render user-data that carries it.

Reading. The user-data an instance gets from IMDS is whatever the launch template held (EC2 has
already undone the API's base64). We accept, in any combination:

- a MIME multi-part document (``multipart/mixed``, as nodeadm, Karpenter and EKS managed node groups
  use), possibly nested, whose part with ``Content-Type: application/nodeagent.yaml`` holds a
  nodeagent config (several such parts are merged in order, later wins);
- the whole user-data, or one part, gzip-compressed (cloud-init convention) and/or base64-encoded
  (``Content-Transfer-Encoding: base64``, or a bare base64 body: Karpenter copies only the
  ``Content-Type`` header of a part, so an encoded part loses its encoding header on the way).

User-data that is not MIME (a shell script, ``#cloud-config``, a bare NodeConfig) holds no nodeagent
part and is fine. It is an error, reported clearly, when the user-data looks like it was meant for us
but cannot be read: broken gzip/MIME, a bare NodeAgentConfig outside MIME, a part that is not UTF-8.

Writing. ``render_al2023`` builds the MIME document for an AL2023 launch template: the nodeagent part
and, when cluster details are given, a NodeConfig part (``application/node.eks.aws``,
``node.eks.aws/v1alpha1``) carrying the four fields nodeadm requires (name, apiServerEndpoint,
certificateAuthority, cidr). ``eks/karpenter.py`` wraps it for Karpenter (EC2NodeClass, NodePool,
the opt-in startup taint and its remover).

The nodeagent part carries the node's settings without the comments and blank lines of the file they
come from (``compact_config``): EC2 caps user-data at 16 KiB (``EC2_USERDATA_LIMIT``).
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import ipaddress
import re
import zlib
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

import yaml

CONTENT_TYPE = "application/nodeagent.yaml"
NODECONFIG_CONTENT_TYPE = "application/node.eks.aws"
NODECONFIG_API_VERSION = "node.eks.aws/v1alpha1"
BOUNDARY = "//nodeagent//"
MAX_DECODED_BYTES = 1024 * 1024  # bound on decompressed user-data (gzip bombs)
MAX_LAYERS = 4  # gzip/base64 wrappers we unwrap at most

# The AMI tag the Packer template puts on a baked image, selected by the EC2NodeClass.
DEFAULT_AMI_TAG = ("nodeagent.io/baked", "true")
EC2_USERDATA_LIMIT = 16 * 1024  # bytes of user-data EC2 accepts (before base64)
# Karpenter appends its own NodeConfig part (~1 KiB and more with spec.kubelet): warn well before.
USERDATA_WARN_BYTES = 12 * 1024

_B64 = re.compile(rb"^[A-Za-z0-9+/\r\n]+={0,2}\s*$")


class UserDataError(ValueError):
    """The user-data cannot be read. The message names what was wrong and where."""


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def _gunzip(data: bytes, where: str) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_DECODED_BYTES + 1)
    except zlib.error as e:
        raise UserDataError(f"{where}: gzip data is corrupt ({e})") from None
    if len(out) > MAX_DECODED_BYTES or d.unconsumed_tail:
        raise UserDataError(f"{where}: decompresses to more than {MAX_DECODED_BYTES} bytes")
    if not d.eof:
        raise UserDataError(f"{where}: gzip data is truncated")
    return out


def _looks_base64(data: bytes) -> bool:
    stripped = b"".join(data.split())
    return len(stripped) >= 8 and len(stripped) % 4 == 0 and _B64.match(data.strip()) is not None


def unwrap(data: bytes, where: str = "user-data") -> bytes:
    """Undo gzip and bare-base64 layers (in any order, at most MAX_LAYERS)."""
    for _ in range(MAX_LAYERS):
        if data[:2] == b"\x1f\x8b":
            data = _gunzip(data, where)
        elif _looks_base64(data):
            # a YAML mapping always holds ':' and MIME headers hold ':' too, so text that is
            # entirely base64 alphabet is an encoded layer, not content
            try:
                data = base64.b64decode(b"".join(data.split()), validate=True)
            except binascii.Error:
                return data
        else:
            return data
    return data


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserDataError(f"{where}: not UTF-8 text (byte {e.start})") from None


def _is_mime(data: bytes) -> bool:
    head = data.lstrip()[:200].lower()
    return head.startswith((b"mime-version:", b"content-type:"))


def _parts(msg: Message, where: str) -> list[tuple[str, Message]]:
    """Leaf parts in document order, each with a readable location (``part 2.1``)."""
    if not msg.is_multipart():
        return [(where, msg)]
    payload = msg.get_payload()
    assert isinstance(payload, list)
    out: list[tuple[str, Message]] = []
    for i, sub in enumerate(payload, 1):
        out.extend(_parts(sub, f"{where}, part {i}" if where else f"part {i}"))
    return out


def _check_defects(msg: Message, where: str) -> None:
    for part in msg.walk():
        for defect in part.defects:
            name = type(defect).__name__
            if name in {
                "NoBoundaryInMultipartDefect",
                "StartBoundaryNotFoundDefect",
                "CloseBoundaryNotFoundDefect",
                "MultipartInvariantViolationDefect",
                "InvalidBase64PaddingDefect",
                "InvalidBase64CharactersDefect",
                "InvalidBase64LengthDefect",
            }:
                doc = (defect.__doc__ or name).strip().rstrip(".")
                raise UserDataError(f"{where}: not a valid MIME multi-part document: {doc}")


def nodeagent_parts(user_data: bytes | None) -> list[tuple[str, str]]:
    """Every ``application/nodeagent.yaml`` part as ``(location, yaml_text)``; [] when there is none."""
    if not user_data or not user_data.strip():
        return []
    data = unwrap(user_data)
    if not _is_mime(data):
        head = data.lstrip()[:4096]
        if CONTENT_TYPE.encode() in head:
            raise UserDataError(
                f"user-data: mentions {CONTENT_TYPE} but is not a MIME multi-part document "
                "(it must start with 'MIME-Version: 1.0' or 'Content-Type: multipart/mixed; boundary=...')"
            )
        if re.search(rb"^kind:\s*NodeAgentConfig\s*$", head, re.M):
            raise UserDataError(
                "user-data: a bare NodeAgentConfig is not read; put it in a MIME part with "
                f"'Content-Type: {CONTENT_TYPE}' (see `nodeagent userdata --format al2023`)"
            )
        return []  # a shell script, #cloud-config or a bare NodeConfig: nothing for nodeagent
    return _mime_parts(data, CONTENT_TYPE)


def _mime_parts(data: bytes, content_type: str) -> list[tuple[str, str]]:
    """Every leaf part of the MIME document ``data`` of ``content_type``, decoded, in order."""
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
    _check_defects(msg, "user-data")
    found: list[tuple[str, str]] = []
    for loc, part in _parts(msg, ""):
        if part.get_content_type() != content_type:
            continue
        where = f"user-data {loc or 'body'} ({content_type})"
        raw = part.get_payload(decode=True)
        found.append((where, _text(unwrap(raw if isinstance(raw, bytes) else b"", where), where)))
    return found


def nodeconfig_parts(user_data: bytes | None) -> list[tuple[str, str]]:
    """Every NodeConfig nodeadm reads from this user-data, as ``(location, yaml_text)``, in order.

    As nodeadm's ``imds://user-data`` source: each ``application/node.eks.aws`` part of a MIME
    document (base64/gzip undone), or, when the user-data is not MIME, the whole of it when it is
    a NodeConfig. Raises ``UserDataError`` when the user-data cannot be read.
    """
    if not user_data or not user_data.strip():
        return []
    data = unwrap(user_data)
    if not _is_mime(data):
        text = _text(data, "user-data")
        return [("user-data", text)] if re.search(r"^kind:\s*NodeConfig\s*$", text, re.M) else []
    return _mime_parts(data, NODECONFIG_CONTENT_TYPE)


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterDetails:
    """The coordinates nodeadm requires (``aws eks describe-cluster``)."""

    name: str
    api_server_endpoint: str
    certificate_authority: str  # base64 of the CA bundle, as describe-cluster returns it
    cidr: str  # the cluster's service CIDR (nodeadm derives the cluster DNS address from it)

    def problems(self) -> list[str]:
        out: list[str] = []
        if not re.fullmatch(r"[0-9A-Za-z][A-Za-z0-9_-]{0,99}", self.name):
            out.append(f"--cluster-name: {self.name!r} is not an EKS cluster name")
        u = urlsplit(self.api_server_endpoint)
        if u.scheme != "https" or not u.hostname:
            out.append(f"--api-server-endpoint: {self.api_server_endpoint!r} must be an https:// URL")
        try:
            ca = base64.b64decode(self.certificate_authority, validate=True)
            if not ca:
                raise binascii.Error("empty")
        except (binascii.Error, ValueError):
            out.append("--certificate-authority: must be the base64 CA data from describe-cluster")
        try:
            ipaddress.ip_network(self.cidr, strict=True)
        except ValueError:
            out.append(f"--cidr: {self.cidr!r} is not a CIDR block such as 10.100.0.0/16")
        return out


def nodeconfig(cluster: ClusterDetails) -> dict[str, Any]:
    return {
        "apiVersion": NODECONFIG_API_VERSION,
        "kind": "NodeConfig",
        "spec": {
            "cluster": {
                "name": cluster.name,
                "apiServerEndpoint": cluster.api_server_endpoint,
                "certificateAuthority": cluster.certificate_authority,
                "cidr": cluster.cidr,
            }
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the MIME document in ``userData``) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def render_mime(parts: list[tuple[str, str]]) -> str:
    """A ``multipart/mixed`` document with LF line ends and a fixed boundary (stable output)."""
    lines = ["MIME-Version: 1.0", f'Content-Type: multipart/mixed; boundary="{BOUNDARY}"', ""]
    for ctype, body in parts:
        if f"--{BOUNDARY}" in body:
            raise UserDataError(f"{ctype} part contains the MIME boundary {BOUNDARY!r}")
        lines += [f"--{BOUNDARY}", f"Content-Type: {ctype}", "", body.rstrip("\n"), ""]
    lines += [f"--{BOUNDARY}--", ""]
    return "\n".join(lines)


def compact_config(config_text: str) -> str:
    """The config's settings as YAML without comments, blank lines or layout: the same document for
    ``nodeagent.config`` (keys in their order), in fewer bytes."""
    try:
        doc = yaml.safe_load(config_text)
    except yaml.YAMLError as e:
        raise UserDataError(f"config: not valid YAML ({e})") from None
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000, allow_unicode=False)


def size_report(document: str) -> tuple[int, str | None]:
    """The size in bytes of rendered user-data and a warning when it is near or over EC2's limit."""
    n = len(document.encode())
    if n > EC2_USERDATA_LIMIT:
        return n, f"user-data is {n} bytes: more than EC2's limit of {EC2_USERDATA_LIMIT} bytes"
    if n > USERDATA_WARN_BYTES:
        return n, (
            f"user-data is {n} bytes, near EC2's limit of {EC2_USERDATA_LIMIT} bytes (Karpenter appends "
            "its own NodeConfig part): move fleet-wide settings into the baked config"
        )
    return n, None


def render_al2023(config_text: str, cluster: ClusterDetails | None = None) -> str:
    parts = [(CONTENT_TYPE, config_text)]
    if cluster is not None:
        parts.append((NODECONFIG_CONTENT_TYPE, "---\n" + dump_yaml(nodeconfig(cluster))))
    return render_mime(parts)
