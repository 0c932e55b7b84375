"""A FAKE EC2 instance metadata service (IMDSv2) on loopback, for tests. Not AWS.

Faithful to the parts of the protocol nodeagent uses (AWS EC2 user guide, "Use IMDSv2"):
- ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` in 1..21600, else 400;
  a request carrying ``X-Forwarded-For`` gets 403; the token is the body (text/plain) and the TTL is
  echoed in the same header.
- every GET needs a valid, unexpired ``X-aws-ec2-metadata-token`` (IMDSv2 "required" mode), else 401.
- ``GET /latest/user-data`` returns the user-data bytes as given at launch, or 404 when there is none.
- any other path is 404; other methods on the token path are 405.
Knobs for failure tests: ``fail_next`` (HTTP 5xx for the next N requests), ``expire_tokens``
(every issued token is already expired), ``hang`` (accept and never answer).
"""

from __future__ import annotations

import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeImds:
    def __init__(self, user_data: bytes | None = None) -> None:
        self.user_data = user_data
        self.tokens: dict[str, float] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.fail_next = 0
        self.expire_tokens = False
        self.hang = False
        self._lock = threading.Lock()
        self._released = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                with fake._lock:
                    fake.requests.append((self.command, self.path, status))
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _gate(self) -> bool:
                if fake.hang:
                    fake._released.wait(30)
                    return False
                if fake.fail_next > 0:
                    fake.fail_next -= 1
                    self._send(503, b"Service Unavailable")
                    return False
                return True

            def do_PUT(self) -> None:
                if not self._gate():
                    return
                if self.path != "/latest/api/token":
                    self._send(404 if not self.path.startswith("/latest/") else 405)
                    return
                if self.headers.get("X-Forwarded-For"):
                    self._send(403, b"Forbidden")
                    return
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    self._send(400, b"Bad Request")
                    return
                token = secrets.token_urlsafe(32)
                with fake._lock:
                    fake.tokens[token] = time.monotonic() + (-1 if fake.expire_tokens else int(ttl))
                self._send(200, token.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": ttl})

            def do_GET(self) -> None:
                if not self._gate():
                    return
                token = self.headers.get("X-aws-ec2-metadata-token", "")
                expiry = fake.tokens.get(token)
                if expiry is None or expiry < time.monotonic():
                    self._send(401, b"Unauthorized")
                    return
                if self.path == "/latest/user-data":
                    if fake.user_data is None:
                        self._send(404, b"Not Found")
                    else:
                        self._send(200, fake.user_data)
                    return
                self._send(404, b"Not Found")

            def do_POST(self) -> None:
                self._send(405)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-imds", daemon=True
        )

    def __enter__(self) -> FakeImds:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
