"""IMDSv2 client against a FAKE IMDS on loopback (tests/fakes/imds.py), never the real 169.254.169.254."""

from __future__ import annotations

import pytest

from nodeagent.eks.imds import ImdsClient, ImdsError, ImdsSettings
from tests.fakes.imds import FakeImds
from tests.sandbox.net import RefusedPort


def client(endpoint: str, **kw: float) -> ImdsClient:
    return ImdsClient(ImdsSettings(endpoint=endpoint, **kw))  # type: ignore[arg-type]


def test_token_then_user_data() -> None:
    with FakeImds(b"#!/bin/sh\necho hi\n") as fake:
        assert client(fake.endpoint).user_data() == b"#!/bin/sh\necho hi\n"
    assert [(m, p) for m, p, _ in fake.requests] == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/user-data"),
    ]


def test_fake_is_faithful_401_without_token() -> None:
    import http.client

    with FakeImds(b"x") as fake:
        host, port = fake.server.server_address[:2]
        conn = http.client.HTTPConnection(str(host), int(port), timeout=2)
        conn.request("GET", "/latest/user-data")
        assert conn.getresponse().status == 401
        conn.close()
        conn = http.client.HTTPConnection(str(host), int(port), timeout=2)
        conn.request("PUT", "/latest/api/token")  # no TTL header
        assert conn.getresponse().status == 400
        conn.close()


def test_no_user_data_is_none() -> None:
    with FakeImds(None) as fake:
        assert client(fake.endpoint).user_data() is None


def test_retries_server_errors_within_bound() -> None:
    with FakeImds(b"data") as fake:
        fake.fail_next = 2
        assert client(fake.endpoint, backoff=0.01).user_data() == b"data"
    assert [s for _, _, s in fake.requests] == [503, 503, 200, 200]


def test_gives_up_after_bounded_attempts() -> None:
    with FakeImds(b"data") as fake:
        fake.fail_next = 100
        with pytest.raises(ImdsError, match="token request failed: HTTP 503") as e:
            client(fake.endpoint, backoff=0.01, attempts=3).user_data()
    assert e.value.unreachable
    assert len(fake.requests) == 3


def test_expired_token_is_refreshed_once_then_error() -> None:
    with FakeImds(b"data") as fake:
        fake.expire_tokens = True
        with pytest.raises(ImdsError):
            client(fake.endpoint, backoff=0.01).user_data()
    gets = [s for m, _, s in fake.requests if m == "GET"]
    puts = [s for m, _, s in fake.requests if m == "PUT"]
    assert gets and set(gets) == {401}
    assert len(puts) == 2  # the first token and exactly one refresh


def test_refused_is_unreachable_after_the_bounded_retries() -> None:
    # how fast: bench/bench_imds_fallback.py
    with RefusedPort() as refused, pytest.raises(ImdsError) as e:
        client(refused.url, backoff=0.01).user_data()
    assert e.value.unreachable and "token request failed: ConnectionRefusedError" in str(e.value)


def test_hung_imds_is_unreachable_at_the_deadline() -> None:
    # how long it takes against the overall deadline: bench/bench_imds_fallback.py
    with FakeImds(b"data") as fake:
        fake.hang = True
        with pytest.raises(ImdsError) as e:
            client(fake.endpoint, request_timeout=0.3, deadline=0.8, backoff=0.05).user_data()
    assert e.value.unreachable and "token request failed" in str(e.value)
    assert "timed out" in str(e.value)


@pytest.mark.parametrize(
    "endpoint", ["https://169.254.169.254", "http://x/latest", "169.254.169.254", "http://u@h"]
)
def test_endpoint_must_be_plain_http_host(endpoint: str) -> None:
    with pytest.raises(ImdsError, match="must look like"):
        ImdsClient(ImdsSettings(endpoint=endpoint))


def test_oversized_user_data_refused() -> None:
    with FakeImds(b"x" * (16 * 1024 + 1)) as fake, pytest.raises(ImdsError, match="larger than"):
        client(fake.endpoint).user_data()


def test_endpoint_from_env() -> None:
    assert (
        ImdsSettings.from_env({"NODEAGENT_IMDS_ENDPOINT": "http://127.0.0.1:9"}).endpoint
        == "http://127.0.0.1:9"
    )
    assert ImdsSettings.from_env({}).endpoint == "http://169.254.169.254"
