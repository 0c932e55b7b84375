"""Single-flight for PullImage: concurrent pulls of one image by the same identity share one upstream call.

The key of a pull is ``(image, credentials fingerprint, runtime handler)``:

- the image reference, normalized (``busybox`` and ``docker.io/library/busybox:latest`` are one);
- a keyed hash (HMAC-SHA256, key random per process) of the credentials' user name, password, identity
  token and registry token, with a ``auth`` field (base64 ``user:password``) read as the pair it holds;
  ``""`` for an anonymous pull. Callers with different credentials never share a pull: the kubelet's
  image credential verification (KEP-2535) relies on a pull with the caller's own credentials
  succeeding, and a private image must never be handed to a caller whose credentials were not checked;
- ``ImageSpec.runtime_handler`` (different handlers may unpack into different snapshotters).

``Flights`` is the table; ``Flight`` one upstream pull and the callers waiting for it. The proxy owns
both (nodeagent/proxy/server.py): it starts the upstream call for the first caller, adds later callers,
answers every caller when the upstream answers, and cancels the upstream only when the last caller
left. Nothing here touches the network.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodeagent.util.imageref import normalize

Key = tuple[str, str, str]
# One caller's end of a flight: ``deliver(message, None)`` or ``deliver(None, error)``.
Deliver = Callable[[bytes | None, Any], None]

_PROCESS_KEY = secrets.token_bytes(32)


def credentials_fingerprint(auth: Any) -> str:
    """A keyed hash of a runtime.v1.AuthConfig's identity; ``""`` when it carries no credentials.

    ``server_address`` does not take part: it names where the credentials are for, not who pulls."""
    if auth is None:
        return ""
    user, password = auth.username, auth.password
    if auth.auth and not (user or password):
        try:
            user, _, password = base64.b64decode(auth.auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user, password = "", "raw:" + auth.auth
    parts = (user, password, auth.identity_token, auth.registry_token)
    if not any(parts):
        return ""
    text = "\0".join(parts).encode()
    return hmac.new(_PROCESS_KEY, text, hashlib.sha256).hexdigest()[:32]


def pull_key(request: Any) -> Key:
    """The single-flight key of a decoded runtime.v1.PullImageRequest."""
    image = request.image.image
    try:
        name = normalize(image)
    except Exception:  # an odd reference: only identical text shares
        name = image
    auth = request.auth if request.HasField("auth") else None
    return (name, credentials_fingerprint(auth), request.image.runtime_handler)


@dataclass(eq=False)
class Waiting:
    """One caller of a flight."""

    deliver: Deliver
    state: Any  # the proxy's bookkeeping for this caller (its pull record in the making, its answer)
    timer: Any = None  # asyncio.TimerHandle of the caller's own deadline


@dataclass(eq=False)
class Flight:
    key: Key
    waiting: list[Waiting] = field(default_factory=list)
    cancel_upstream: Callable[[], None] | None = None
    done: bool = False


class Flights:
    """The table of pulls in flight (bounded by the callers: a flight lives while one waits)."""

    def __init__(self) -> None:
        self._flights: dict[Key, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: Key) -> Flight | None:
        return self._flights.get(key)

    def begin(self, key: Key) -> Flight:
        flight = Flight(key)
        self._flights[key] = flight
        return flight

    def end(self, flight: Flight) -> list[Waiting]:
        """The upstream answered: the flight leaves the table; every caller still waiting is returned
        (each gets the answer)."""
        flight.done = True
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        waiting, flight.waiting = flight.waiting, []
        for w in waiting:
            if w.timer is not None:
                w.timer.cancel()
        return waiting

    def leave(self, flight: Flight, waiting: Waiting) -> bool:
        """A caller went away (cancelled, or its deadline passed). Returns False if it had already
        been answered. The last caller to leave cancels the upstream pull."""
        if waiting not in flight.waiting:
            return False
        flight.waiting.remove(waiting)
        if waiting.timer is not None:
            waiting.timer.cancel()
        if not flight.waiting and not flight.done:
            flight.done = True
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]
            if flight.cancel_upstream is not None:
                flight.cancel_upstream()
        return True
