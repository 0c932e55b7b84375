"""Where ``nodeagent apply`` puts download concurrency, judged by real containerd 2.2, 2.4 and 1.6.

containerd 2.1+ pulls CRI images through its transfer service unless a CRI images setting forces
its old local pull (it then logs "Falling back to local image pull mode" at start); 1.6 always pulls
locally. What users rely on: after ``apply`` (generic flavor, on the stock ``containerd config
default`` of each version, restarted through ``containerd.restartCommand``):

- nodeagent never is the reason containerd leaves the transfer service;
- an 8-layer image pulled through CRI has exactly ``containerd.maxConcurrentDownloads`` blob
  downloads in flight, measured by a proxy in front of the registry that holds every blob GET 1 s,
  on the path containerd reports in its debug log ("using transfer service" / "using client.Pull()");
- with nodeadm's ``discard_unpacked_layers = true`` (local pull forced by nodeadm, not by us) the
  CRI value is the one that counts, and it is the one apply wrote.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tomlkit

from nodeagent.cri.client import CriError
from tests.integration.test_apply import Node
from tests.sandbox import PushedImage, Registry, Sandbox, testbins

FALLBACK = "Falling back to local image pull mode"
HOLD = 1.0  # seconds every blob GET is held
LAYERS = 8
DOWNLOADS = 5  # what the nodeagent config asks for: neither containerd's default 3 nor the layer count


class SlowBlobProxy:
    """An HTTP proxy in front of a registry that holds every blob GET ``hold`` seconds and records
    how many blob GETs were in flight at once (plain ``http.server``/``http.client``)."""

    def __init__(self, upstream: str, hold: float) -> None:
        self.upstream, self.hold = upstream, hold
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.blob_gets = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                blob = self.command == "GET" and "/blobs/sha256:" in self.path
                if blob:
                    with proxy.lock:
                        proxy.in_flight += 1
                        proxy.blob_gets += 1
                        proxy.peak = max(proxy.peak, proxy.in_flight)
                try:
                    if blob:
                        time.sleep(proxy.hold)
                    conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                    }
                    conn.request(self.command, self.path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                    conn.close()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                finally:
                    if blob:
                        with proxy.lock:
                            proxy.in_flight -= 1

            do_GET = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PullNode(Node):
    """test_apply's node tree T, holding the stock ``containerd config default`` of ``binary`` instead
    (daemon paths moved into the sandbox, debug log), with ``T/usr/bin/containerd`` -> ``binary``
    (apply reads the version from it); started and restarted with that binary."""

    def __init__(self, sandbox: Sandbox, binary: Path, cri_images: dict[str, object] | None = None) -> None:
        super().__init__(sandbox)
        self.binary = binary
        (self.root / "usr/bin").mkdir(parents=True, exist_ok=True)
        (self.root / "usr/bin/containerd").unlink(missing_ok=True)  # Node's link to the line's binary
        (self.root / "usr/bin/containerd").symlink_to(binary)
        stock = subprocess.run([str(binary), "config", "default"], capture_output=True, text=True, check=True)
        doc = tomlkit.parse(stock.stdout)
        doc["root"] = str(self.work / "root")
        doc["state"] = str(self.work / "state")
        plugins = doc["plugins"]
        # version 4 (containerd 2.4) keeps the server addresses in plugins
        server = (
            doc if "grpc" in doc else {k: plugins[f"io.containerd.server.v1.{k}"] for k in ("grpc", "ttrpc")}
        )  # type: ignore[index]
        server["grpc"]["address"] = str(self.sock)  # type: ignore[index]
        server["ttrpc"]["address"] = str(self.sock) + ".ttrpc"  # type: ignore[index]
        doc["debug"]["level"] = "debug"  # type: ignore[index]
        if int(doc["version"]) >= 3:  # type: ignore[arg-type]
            images = plugins["io.containerd.cri.v1.images"]  # type: ignore[index]
        else:
            images = plugins["io.containerd.grpc.v1.cri"]["containerd"]  # type: ignore[index]
        for k, v in (cri_images or {}).items():
            images[k] = v  # type: ignore[index]
        self.config_toml.write_text(tomlkit.dumps(doc))

    def restart_command(self, *extra: str) -> list[str]:
        return super().restart_command(*extra, "--containerd", str(self.binary))

    def plain_http(self, host: str) -> None:
        d = self.root / str(self.hosts_dir).lstrip("/") / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(f'server = "http://{host}"\n')

    def log_text(self, since: int = 0) -> str:
        with open(self.log, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0


@pytest.fixture
def slow_proxy_factory() -> Iterator[Callable[[Registry], SlowBlobProxy]]:
    made: list[SlowBlobProxy] = []

    def make(registry: Registry) -> SlowBlobProxy:
        p = SlowBlobProxy(registry.host, HOLD)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def containerd_binary(line: str) -> Path:
    if line == "1.6":
        found = shutil.which("containerd")  # Debian's
        assert found, "Debian's containerd is not installed (scripts/setup.sh)"
        return Path(found)
    if line == "2.4":
        return built("containerd-latest")  # the newest 2.x
    return built("containerd")  # 2.2.x, as EKS AL2023 ships


def built(name: str) -> Path:
    """A test binary from the shared cache, built first when missing (tests/sandbox/testbins.py)."""
    testbins.build([name])
    return testbins.path(name)


CASES = [
    # (containerd line, CRI images settings the node had before apply, expected path)
    pytest.param("2.2", {}, "transfer", id="2.2-stock"),
    pytest.param("2.2", {"discard_unpacked_layers": True}, "local", id="2.2-nodeadm-discard"),
    pytest.param("2.4", {}, "transfer", id="2.4-stock"),
    pytest.param("1.6", {}, "local", id="1.6-stock"),
]


@pytest.mark.parametrize(("line", "cri_images", "path"), CASES)
def test_configured_layers_in_flight_on_the_path_containerd_takes(
    sandbox: Sandbox,
    registry: Registry,
    image_factory: Callable[..., PushedImage],
    slow_proxy_factory: Callable[[Registry], SlowBlobProxy],
    line: str,
    cri_images: dict[str, object],
    path: str,
) -> None:
    node = PullNode(sandbox, containerd_binary(line), cri_images)
    proxy = slow_proxy_factory(registry)
    node.plain_http(proxy.host)
    node.write_config({"restartCommand": node.restart_command(), "maxConcurrentDownloads": DOWNLOADS})
    node.start()

    mark = node.log_size()
    r = node.apply("--flavor", "generic")
    assert r.returncode == 0, r.stderr
    assert "containerd: restarted, CRI answers" in r.stdout
    where = "io.containerd.transfer.v1.local" if path == "transfer" else "cri"
    (note,) = [ln for ln in r.stdout.splitlines() if ln.startswith("note: containerd download concurrency")]
    assert where in note, note
    started = node.log_text(mark)
    # never nodeagent's doing: no fallback at all on the transfer path, and on the local path only
    # because of the setting nodeadm made (containerd names the first setting it found)
    fallbacks = [ln for ln in started.splitlines() if FALLBACK in ln]
    if path == "transfer" or line == "1.6":
        assert fallbacks == []
    else:
        assert fallbacks and all("'DiscardUnpackedLayers'" in ln for ln in fallbacks), fallbacks
    assert "Found 'MaxConcurrentDownloads'" not in started  # the fallback the old apply caused

    img = image_factory(layers=LAYERS, layer_size=256 << 10, repository=f"pullpath/{line}-{path}")
    ref = f"{proxy.host}/{img.repository}:{img.tag}"
    mark = node.log_size()
    t0 = time.monotonic()
    assert node.pull(ref) == img.image_id
    took = time.monotonic() - t0
    assert proxy.blob_gets >= LAYERS  # every layer (and the config) went through the proxy
    assert proxy.peak == DOWNLOADS, f"{proxy.peak} blob downloads at once, configured {DOWNLOADS}"
    assert took >= 2 * HOLD  # 9 blobs, 5 at a time, 1 s each: at least two rounds
    reported = node.log_text(mark)
    if line != "1.6":  # 1.6 logs no pull path: it has only the local one
        word = "using transfer service" if path == "transfer" else "using client.Pull()"
        assert word in reported, reported[-3000:]


@pytest.mark.parametrize("line", ["2.2", "2.4"])
def test_transfer_path_reads_config_path_as_one_directory(
    sandbox: Sandbox, registry: Registry, image_factory: Callable[..., PushedImage], line: str
) -> None:
    """Why apply writes ``hostsDir`` alone on the transfer path: with a ':' list there containerd
    finds no hosts.toml (it asks the registry name itself), with the directory alone it does."""
    node = PullNode(sandbox, containerd_binary(line))
    # a registry name only hosts.toml can resolve (containerd speaks plain HTTP to loopback by itself)
    name = f"only-in-hosts-toml.invalid:{registry.host.rsplit(':', 1)[1]}"
    d = node.root / str(node.hosts_dir).lstrip("/") / name
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(f'server = "{registry.url}"\n')
    img = image_factory(layers=1, layer_size=64 << 10, repository=f"pullpath/config-path-{line}")
    ref = f"{name}/{img.repository}:{img.tag}"
    listed = f"{node.hosts_dir}:/etc/docker/certs.d"
    for config_path, works in ((listed, False), (str(node.hosts_dir), True)):
        doc = tomlkit.parse(node.config_toml.read_text())
        doc["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"] = config_path  # type: ignore[index]
        node.config_toml.write_text(tomlkit.dumps(doc))
        node.start()  # the restart helper stops the previous one first
        if works:
            assert node.pull(ref) == img.image_id
        else:
            with pytest.raises(CriError, match=r"https://only-in-hosts-toml\.invalid"):
                node.pull(ref)  # no hosts.toml found: containerd asks the name itself, over HTTPS
    assert FALLBACK not in node.log_text()  # all of it on the transfer path
