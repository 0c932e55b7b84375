"""EC2 instance metadata (IMDSv2) client: fetch the instance user-data, bounded in time.

Protocol (AWS "Use the Instance Metadata Service to access instance metadata", IMDSv2):

1. ``PUT /latest/api/token`` with header ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600`` returns a
   session token as the body (400 when the TTL header is missing or out of range, 403 when IMDS is
   disabled for the instance or the request carries ``X-Forwarded-For``).
2. ``GET /latest/user-data`` with header ``X-aws-ec2-metadata-token: <token>`` returns the user-data
   bytes exactly as given at launch (already base64-decoded by EC2); 404 when the instance has no
   user-data; 401 when the token is missing, expired or invalid.

Only the standard library is used (``http.client``), so the boot path pulls in nothing new. Every
request has a socket timeout, retries are bounded and the whole fetch has one overall deadline, so a
node whose IMDS is unreachable falls back to its baked config in bounded time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from nodeagent.util.backoff import Backoff

DEFAULT_ENDPOINT = "http://169.254.169.254"
ENDPOINT_ENV = "NODEAGENT_IMDS_ENDPOINT"
TOKEN_PATH = "/latest/api/token"  # noqa: S105 (a URL path, not a secret)
USER_DATA_PATH = "/latest/user-data"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"  # noqa: S105 (header name)
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 (header name)
TOKEN_TTL_SECONDS = 60  # we use the token for two requests at most
MAX_USER_DATA_BYTES = 16 * 1024  # EC2 limit on user-data before base64 encoding
MAX_TOKEN_BYTES = 4096


class ImdsError(Exception):
    """IMDS could not be used. ``unreachable`` means no answer at all (connection/timeout)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class _Retryable(Exception):
    pass


@dataclass(frozen=True)
class ImdsSettings:
    endpoint: str = DEFAULT_ENDPOINT
    request_timeout: float = 1.0  # per connect/read
    attempts: int = 3  # per request
    backoff: float = 0.2  # first retry delay, doubled each time
    deadline: float = 5.0  # overall, for the token and the user-data together

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, endpoint: str | None = None) -> ImdsSettings:
        e = os.environ if env is None else env
        return cls(endpoint=endpoint or e.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    u = urlsplit(endpoint)
    if u.scheme != "http" or not u.hostname or u.path not in ("", "/") or u.query or u.username:
        raise ImdsError(f"{endpoint!r}: IMDS endpoint must look like http://HOST[:PORT]")
    return u.hostname, u.port or 80


class ImdsClient:
    """Fetch user-data through IMDSv2. ``clock``/``sleep`` are injectable for tests."""

    def __init__(
        self,
        settings: ImdsSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings or ImdsSettings()
        self._host, self._port = _split_endpoint(self.settings.endpoint)
        self._clock = clock
        self._sleep = sleep

    # -- one HTTP exchange ----------------------------------------------------------------------
    def _request(
        self, method: str, path: str, headers: dict[str, str], limit: int, deadline: float
    ) -> tuple[int, bytes]:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise _Retryable("deadline reached")
        timeout = min(self.settings.request_timeout, remaining)
        import http.client  # only when IMDS is used: ~30 ms of imports kept off every command's start

        conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read(limit + 1)
            return resp.status, body
        except (OSError, http.client.HTTPException) as e:
            # OSError covers refused, unreachable and socket.timeout; never include headers (token)
            raise _Retryable(type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}") from None
        finally:
            conn.close()

    def _with_retries(self, what: str, deadline: float, fn: Callable[[], bytes | None]) -> bytes | None:
        delays = Backoff(self.settings.backoff, cap=self.settings.deadline).delays()
        last = ""
        for attempt in range(1, self.settings.attempts + 1):
            try:
                return fn()
            except _Retryable as e:
                last = str(e)
            if attempt == self.settings.attempts:
                break
            delay = next(delays)
            if self._clock() + delay >= deadline:
                break
            self._sleep(delay)
        raise ImdsError(f"IMDS {self.settings.endpoint}: {what} failed: {last}", unreachable=True)

    # -- the protocol ------------------------------------------------------------------------------
    def _token(self, deadline: float) -> bytes:
        def once() -> bytes | None:
            status, body = self._request(
                "PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(TOKEN_TTL_SECONDS)}, MAX_TOKEN_BYTES, deadline
            )
            if status == 200:
                if not body or len(body) > MAX_TOKEN_BYTES:
                    raise ImdsError(f"IMDS {self.settings.endpoint}: token response is empty or too long")
                return body.strip()
            if status >= 500:
                raise _Retryable(f"HTTP {status}")
            if status == 403:
                raise ImdsError(f"IMDS {self.settings.endpoint}: token request forbidden (IMDS disabled?)")
            raise ImdsError(f"IMDS {self.settings.endpoint}: token request answered HTTP {status}")

        token = self._with_retries("token request", deadline, once)
        assert token is not None  # once() never returns None
        return token

    def user_data(self) -> bytes | None:
        """The raw user-data, or None when the instance has none (404). Raises ImdsError."""
        deadline = self._clock() + self.settings.deadline
        token: bytes = self._token(deadline)
        refreshed = False

        def once() -> bytes | None:
            nonlocal token, refreshed
            status, body = self._request(
                "GET",
                USER_DATA_PATH,
                {TOKEN_HEADER: token.decode("ascii", "replace")},
                MAX_USER_DATA_BYTES,
                deadline,
            )
            if status == 200:
                if len(body) > MAX_USER_DATA_BYTES:
                    raise ImdsError(
                        f"IMDS {self.settings.endpoint}: user-data larger than {MAX_USER_DATA_BYTES} bytes"
                    )
                return body
            if status == 404:
                return None
            if status == 401 and not refreshed:
                refreshed = True  # token expired between the two calls: get a new one, once
                token = self._token(deadline)
                raise _Retryable("HTTP 401 (token refreshed)")
            if status >= 500:
                raise _Retryable(f"HTTP {status}")
            raise ImdsError(f"IMDS {self.settings.endpoint}: user-data request answered HTTP {status}")

        return self._with_retries("user-data request", deadline, once)
