"""A local CNCF distribution registry (Debian's ``docker-registry``) on an ephemeral 127.0.0.1 port.

    reg = Registry(tmp / "reg")                                  # plain HTTP, own storage dir
    reg = Registry(tmp / "auth", auth=("alice", "s3cret"))       # htpasswd (bcrypt) basic auth
                                                                # (more_users=[(u, p), ...]: more logins)
    reg = Registry(tmp / "mirror", proxy_of=upstream)           # pull-through cache of upstream
                                                                # (upstream without auth: 2.8's proxy
                                                                # only authenticates to Bearer realms)
    reg.start(); reg.host -> "127.0.0.1:PORT"; reg.url -> "http://127.0.0.1:PORT"
    reg.blob_requests() -> access-log entries for /v2/<name>/blobs/<digest> (who served what)
    reg.stop(); reg.start()                                      # same port, same storage

A pull-through cache is read-only (pushes are refused): push to the upstream, pull via the mirror.
"""

from __future__ import annotations

import base64
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent import proc
from tests.sandbox.net import free_port
from tests.sandbox.process import Daemon, SandboxError, tail, wait_until

# combined log format as the registry writes it: ... "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 1234 ...
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/v2/\S*) HTTP/[\d.]+" (?P<status>\d{3}) (?P<size>\d+|-)')


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    size: int

    @property
    def is_blob(self) -> bool:
        return "/blobs/sha256:" in self.path and "/uploads/" not in self.path

    @property
    def digest(self) -> str | None:
        m = re.search(r"/blobs/(sha256:[0-9a-f]{64})", self.path)
        return m.group(1) if m else None


class Registry:
    def __init__(
        self,
        workdir: Path,
        *,
        auth: tuple[str, str] | None = None,
        proxy_of: Registry | str | None = None,
        proxy_auth: tuple[str, str] | None = None,
        more_users: Sequence[tuple[str, str]] = (),
        port: int | None = None,
        binary: str = "docker-registry",
    ) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        self.htpasswd_path = workdir / "htpasswd"
        self.auth = auth
        self.more_users = tuple(more_users)  # further htpasswd users (auth must be set)
        self.proxy_url = proxy_of.url if isinstance(proxy_of, Registry) else proxy_of
        if isinstance(proxy_of, Registry) and proxy_of.auth is not None:
            # distribution 2.8 sends proxy credentials only to upstreams that issue Bearer tokens;
            # against an htpasswd (Basic) upstream every proxied request is refused.
            raise ValueError("a pull-through mirror of a Basic-auth (htpasswd) registry does not work")
        self.proxy_auth = proxy_auth
        self.port = port or free_port()
        self.binary = binary
        self._daemon: Daemon | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return self._daemon.pid if self._daemon else None

    @property
    def running(self) -> bool:
        return self._daemon is not None and self._daemon.running

    def authorization(self) -> str | None:
        """The ``Authorization`` header value for this registry's credentials, if it has any."""
        if self.auth is None:
            return None
        return "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()

    def render_config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.auth is not None:
            lines += ["auth:", "  htpasswd:", "    realm: sandbox", f"    path: {self.htpasswd_path}"]
        if self.proxy_url is not None:
            lines += ["proxy:", f"  remoteurl: {self.proxy_url}"]
            if self.proxy_auth is not None:
                lines += [f"  username: {self.proxy_auth[0]}", f"  password: {self.proxy_auth[1]}"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            raise SandboxError(f"registry {self.host}: already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        if self.auth is not None and not self.htpasswd_path.exists():
            user, password = self.auth
            # -i: password from stdin, so it never appears in a process list
            proc.run(["htpasswd", "-iBc", str(self.htpasswd_path), user], stdin=password.encode(), timeout=30)
            for more, secret in self.more_users:
                argv = ["htpasswd", "-iB", str(self.htpasswd_path), more]
                proc.run(argv, stdin=secret.encode(), timeout=30)
        self.config_path.write_text(self.render_config())
        self.config_path.chmod(0o600)
        self._daemon = Daemon(
            f"registry {self.host}", [self.binary, "serve", str(self.config_path)], self.log_path
        )
        self._daemon.start()
        daemon = self._daemon

        def ready() -> bool:
            daemon.check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                    return True
            except urllib.error.HTTPError as e:
                return e.code == 401  # up, and asking for credentials
            except OSError:
                return False

        try:
            wait_until(f"registry {self.url} (log {self.log_path})", ready, timeout)
        except SandboxError as e:
            self.stop()
            raise SandboxError(f"{e}\n{tail(self.log_path)}") from None

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def requests(self) -> list[Request]:
        """Every /v2/ request in the access log so far (across restarts)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for m in _ACCESS.finditer(text):
            size = m.group("size")
            out.append(
                Request(
                    m.group("method"),
                    m.group("path"),
                    int(m.group("status")),
                    int(size) if size.isdigit() else 0,
                )
            )
        return out

    def blob_requests(self, method: str = "GET") -> list[Request]:
        return [r for r in self.requests() if r.is_blob and r.method == method]

    def blob_digests_served(self) -> set[str]:
        """Digests this registry answered a blob GET for with 200."""
        return {r.digest for r in self.blob_requests() if r.status == 200 and r.digest}

    def mark(self) -> int:
        """Number of requests so far; pass to ``requests_since`` to see only what came after."""
        return len(self.requests())

    def requests_since(self, mark: int) -> list[Request]:
        return self.requests()[mark:]
