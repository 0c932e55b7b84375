"""The mirror probe over TLS, with a real certificate made by openssl: ``ca`` and ``skipVerify`` behave
as they do for containerd (the CA is trusted only when configured; skipVerify accepts any cert)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.config.model import Mirror
from nodeagent.mirrorhealth.monitor import ca_resolver
from nodeagent.mirrorhealth.probe import ProbeResult, make_target, probe
from nodeagent.util import proc
from nodeagent.util.paths import Paths


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    key, crt = tmp_path / "mirror.key", tmp_path / "mirror.crt"
    proc.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(crt), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        timeout=60,
    )  # fmt: skip
    return key, crt


@pytest.fixture
def tls_registry(cert: tuple[Path, Path]) -> Iterator[int]:
    """A TLS server on 127.0.0.1 answering every request with 200, as a registry's /v2/."""
    key, crt = cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    loop = asyncio.new_event_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx))
    port = server.sockets[0].getsockname()[1]
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


def run_probe(mirror: Mirror, root: Path) -> ProbeResult:
    resolve = ca_resolver(Paths(root), "/etc/containerd/certs.d")
    target = make_target("registry.example", mirror, lambda p: resolve("registry.example", p))
    return asyncio.run(probe(target, 2.0))


def test_tls_mirror_with_its_ca_configured_is_alive(
    tls_registry: int, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    # the CA given as a host path, read under --root (as the daemon does)
    ca = tmp_path / "root/etc/pki/mirror.crt"
    ca.parent.mkdir(parents=True)
    ca.write_bytes(cert[1].read_bytes())
    r = run_probe(Mirror(f"https://127.0.0.1:{tls_registry}", ca=("/etc/pki/mirror.crt",)), tmp_path / "root")
    assert r.alive and r.status == 200


def test_tls_mirror_ca_relative_to_the_registry_hosts_dir(
    tls_registry: int, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    d = tmp_path / "root/etc/containerd/certs.d/registry.example"
    d.mkdir(parents=True)
    (d / "mirror.crt").write_bytes(cert[1].read_bytes())
    r = run_probe(Mirror(f"https://127.0.0.1:{tls_registry}", ca=("mirror.crt",)), tmp_path / "root")
    assert r.alive and r.status == 200


def test_tls_mirror_with_an_unknown_ca_is_dead(tls_registry: int, tmp_path: Path) -> None:
    r = run_probe(Mirror(f"https://127.0.0.1:{tls_registry}"), tmp_path)
    assert not r.alive and r.error.startswith("TLS: ") and "CERTIFICATE_VERIFY_FAILED" in r.error


def test_tls_mirror_with_skip_verify_is_alive(tls_registry: int, tmp_path: Path) -> None:
    r = run_probe(Mirror(f"https://127.0.0.1:{tls_registry}", skip_verify=True), tmp_path)
    assert r.alive and r.status == 200
