"""Shared pytest fixtures: a real sandbox node (see tests/sandbox/ and ../shared/notes/sandbox-node.md).

Integration tests (everything under tests/integration/, auto-marked ``integration``) run against
real components: containerd, docker-registry, crun, busybox-static. They need root. A
missing component or missing root FAILS the test, it never skips: a skipped integration test must
not count as passing. Under CI (``CI`` set) the run also fails if any test was skipped or if no
integration test ran at all.

containerd lines: every test that uses ``sandbox`` (and so ``containerd``, ``pod_node``, the factories)
or ``containerd_line`` runs once per containerd release line, with the line in its id
(``test_x[containerd1.6]``, ``test_x[containerd2.2]``): Debian's 1.6 (version-2 config) and the 2.x
line EKS AL2023 ships (built by tests/sandbox/testbins.py, version-3 config). Tests marked
``containerd_smoke`` also run on the newest 2.x (``containerd2.4``).
``NODEAGENT_CONTAINERD_LINES=1.6,2.2,2.4`` picks the lines for every test instead. A test that uses
``sandbox`` but starts no containerd is marked ``no_containerd`` (it then runs once); an unmarked one
that starts none fails at teardown, so nothing runs twice for nothing. Where 2.x behaves differently,
the test branches on ``node.line.major`` (or ``sandbox.containerd_line``) and says why in a comment.

Fixtures (all cleaned up at teardown, also when the test fails: processes stopped by PID, mounts
unmounted, loop devices detached, temp dirs removed):

session-scoped (shared; do not mutate, push images under your own repository names):
    session_sandbox   Sandbox for shared components
    registry          a plain-HTTP docker-registry (``.host``, ``.url``, ``.blob_requests()``)
    pause_image       busybox "sleep" image on ``registry`` (runnable; pod sandbox image)

function-scoped (private to one test):
    containerd_line   the ContainerdLine this test runs on (``.name``, ``.major``, ``.id``, ``.binary()``,
                      ``.env()``); None for ``no_containerd`` tests
    sandbox           Sandbox (``.containerd()`` starts ``containerd_line``): ``.registry(**kw)``,
                      ``.image(reg, **build)``, ``.containerd(regs, **kw)``,
                      ``.pod_node(reg)``, ``.loopfs(size_mb)``, ``.hung_server()``, ``.refused_port()``,
                      ``.throttle_proxy(upstream, rate)``, ``.soci_snapshotter(mode=...)`` (SOCI as a
                      2.x containerd's snapshotter: ``.containerd(regs, snapshotter=...)``),
                      ``.nodeagent(node, config=...)`` (``nodeagent
                      run`` as a real process: ``.proxy_endpoint``, ``.scrape()``, ``.status()``),
                      ``.callback(fn)``, ``.dir``
    containerd        a started Containerd knowing ``registry`` (``.endpoint``, ``.root``, ``.hosts_dir``,
                      ``.config_path``, ``.log_path``, ``.stop()``, ``.kill()``, ``.start()``,
                      ``.write_hosts_toml(host, server, mirrors)``)
    pod_node          a started Containerd that can run real pods (private mount ns, cgroup2 only),
                      sandbox image = ``pause_image``
    registry_factory  ``registry_factory(auth=("u", "p"))``, ``registry_factory(proxy_of=other)``
    image_factory     ``image_factory(layers=2, layer_size=1 << 20, to=None, repository=None,
                      tag="v1", busybox=False, seed=None)`` -> PushedImage (``.reference``,
                      ``.manifest_digest``, ``.image_id``, ``.size``, ``.layer_digests``);
                      ``to`` is the registry to push to (default: ``registry``)
    loopfs_factory    ``loopfs_factory(size_mb=200)`` -> LoopFs (``.mountpoint``, ``.usage()``)
    hung_server       accepts TCP, never answers (``.url``, ``.address``)
    refused_port      bound, not listening: connections refused (``.url``)
    throttle_proxy_factory  ``throttle_proxy_factory(registry, rate_bytes_per_s)`` -> ThrottleProxy

Async tests: the CRI client is grpc.aio; write ``asyncio.run(body())`` in a plain test function.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox import (
    LINES,
    Containerd,
    ContainerdLine,
    HungServer,
    LoopFs,
    PushedImage,
    RefusedPort,
    Registry,
    Sandbox,
    ThrottleProxy,
    testbins,
)

INTEGRATION_DIR = Path(__file__).parent / "integration"
# the lines every containerd-using test runs on, and the extra line ``containerd_smoke`` tests run on
FULL_LINES = ("1.6", "2.2")
SMOKE_LINES = ("2.4",)
REQUIRED_PROGRAMS = (
    "containerd",
    "containerd-shim-runc-v2",
    "crun",
    "docker-registry",
    "htpasswd",
    "unshare",
    "mkfs.ext4",
    "losetup",
)


# --- marking, requirements, and the CI guard -------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_containerd: uses the sandbox but starts no containerd (runs once)")
    config.addinivalue_line("markers", "containerd_smoke: also runs on the newest containerd 2.x line")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def _lines_for(definition: pytest.Item) -> list[ContainerdLine]:
    chosen = os.environ.get("NODEAGENT_CONTAINERD_LINES")
    if chosen:
        names = [n.strip().removeprefix("containerd") for n in chosen.split(",") if n.strip()]
    else:
        names = list(FULL_LINES)
        if definition.get_closest_marker("containerd_smoke") is not None:
            names += SMOKE_LINES
    unknown = [n for n in names if n not in LINES]
    if unknown:
        raise pytest.UsageError(
            f"NODEAGENT_CONTAINERD_LINES: unknown line(s) {unknown}; known: {list(LINES)}"
        )
    return [LINES[n] for n in names]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "containerd_line" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("no_containerd") is not None:
        return
    lines = _lines_for(metafunc.definition)
    metafunc.parametrize("containerd_line", lines, ids=[ln.id for ln in lines], indirect=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("integration") is None:
        return
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (run: sudo bash scripts/test.sh)", pytrace=False)
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.fail(f"missing programs {missing}: run scripts/setup.sh", pytrace=False)
    callspec = getattr(item, "callspec", None)
    line = callspec.params.get("containerd_line") if callspec is not None else None
    if isinstance(line, ContainerdLine) and line.testbin is not None:
        try:
            line.binary()
        except testbins.TestbinMissing as e:
            pytest.fail(str(e), pytrace=False)


_outcomes: dict[str, int] = {"skipped": 0, "integration_passed": 0}
_failed_calls: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.failed:
        _failed_calls.add(report.nodeid)
    if report.skipped:
        _outcomes["skipped"] += 1
    elif report.when == "call" and report.passed and "integration" in report.keywords:
        _outcomes["integration_passed"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("CI") or exitstatus not in (0, 5):
        return
    problems = []
    if _outcomes["skipped"]:
        problems.append(f"{_outcomes['skipped']} test(s) skipped")
    if not _outcomes["integration_passed"]:
        problems.append("no integration test ran")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line(f"CI: failing the run: {'; '.join(problems)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- session-scoped ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def session_sandbox() -> Iterator[Sandbox]:
    with Sandbox(prefix="na-session-") as sb:
        yield sb


@pytest.fixture(scope="session")
def registry(session_sandbox: Sandbox) -> Registry:
    return session_sandbox.registry()


@pytest.fixture(scope="session")
def pause_image(session_sandbox: Sandbox, registry: Registry) -> PushedImage:
    return session_sandbox.pause_image(registry)


# --- function-scoped --------------------------------------------------------------------------
@pytest.fixture
def containerd_line(request: pytest.FixtureRequest) -> ContainerdLine | None:
    line: ContainerdLine | None = getattr(request, "param", None)
    return line


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, containerd_line: ContainerdLine | None) -> Iterator[Sandbox]:
    with Sandbox(containerd_line=containerd_line) as sb:
        if containerd_line is None:
            sb.containerd_line = None  # no_containerd: sb.containerd() says so
        yield sb
        unused = containerd_line is not None and not sb.containerds and not sb.line_read
        if unused and request.node.nodeid not in _failed_calls:
            pytest.fail(
                f"{request.node.nodeid} ran on {containerd_line.id} but started no containerd: mark it "
                "@pytest.mark.no_containerd (it then runs once), or pass sandbox.containerd_line on",
                pytrace=False,
            )


@pytest.fixture
def containerd(sandbox: Sandbox, registry: Registry) -> Containerd:
    return sandbox.containerd([registry])


@pytest.fixture
def pod_node(sandbox: Sandbox, registry: Registry, pause_image: PushedImage) -> Containerd:
    return sandbox.containerd([registry], pods=True, sandbox_image=pause_image.reference)


@pytest.fixture
def registry_factory(sandbox: Sandbox) -> Callable[..., Registry]:
    return sandbox.registry


@pytest.fixture
def image_factory(sandbox: Sandbox, registry: Registry) -> Callable[..., PushedImage]:
    def make(
        layers: int = 1,
        layer_size: int = 1 << 20,
        *,
        to: Registry | None = None,
        repository: str | None = None,
        tag: str = "v1",
        **build: Any,
    ) -> PushedImage:
        return sandbox.image(to or registry, repository, tag, layers=layers, layer_size=layer_size, **build)

    return make


@pytest.fixture
def loopfs_factory(sandbox: Sandbox) -> Callable[..., LoopFs]:
    return sandbox.loopfs


@pytest.fixture
def hung_server(sandbox: Sandbox) -> HungServer:
    return sandbox.hung_server()


@pytest.fixture
def refused_port(sandbox: Sandbox) -> RefusedPort:
    return sandbox.refused_port()


@pytest.fixture
def throttle_proxy_factory(sandbox: Sandbox) -> Callable[..., ThrottleProxy]:
    return sandbox.throttle_proxy
