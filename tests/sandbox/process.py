"""Long-running helper processes of the sandbox node: started with a log file, stopped by PID.

Every daemon the harness starts (containerd, docker-registry) is a ``Daemon``. ``stop()`` sends
SIGTERM to that PID, waits, then SIGKILL; it never looks processes up by name. Daemons still alive
at interpreter exit are killed by an ``atexit`` hook as a last resort (the demo relies on it when
interrupted; pytest fixtures stop them explicitly in their finalizers).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

_live: set[Daemon] = set()
_live_lock = threading.Lock()


class SandboxError(RuntimeError):
    """A sandbox component failed to start or stop; the message names it and its log file."""


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Daemon:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.pass_fds = tuple(pass_fds)  # inherited by the process (e.g. a socket to activate it with)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise SandboxError(f"{self.name}: already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    pass_fds=self.pass_fds,
                    start_new_session=True,  # a Ctrl-C in the demo's terminal reaches us, not it
                )
            except FileNotFoundError:
                raise SandboxError(f"{self.name}: {self.argv[0]} not found (run scripts/setup.sh)") from None
        with _live_lock:
            _live.add(self)

    def start_and_wait(
        self,
        what: str,
        ready: Callable[[], object],
        timeout: float,
        *,
        interval: float = 0.1,
        stop: Callable[[], object] | None = None,
        log_lines: int = 15,
        started: bool = False,
    ) -> None:
        """Every sandbox daemon comes up this one way: ``start()`` (unless ``started``), then poll
        ``ready()`` (failing at once if the process exited) until it is truthy. On timeout ``stop()``
        (default: this process's) runs and SandboxError names ``what``, the log file and its last
        ``log_lines`` lines."""
        if not started:
            self.start()

        def alive_and_ready() -> object:
            self.check_alive()
            return ready()

        try:
            wait_until(f"{what} (log {self.log_path})", alive_and_ready, timeout, interval=interval)
        except SandboxError as e:
            (stop or self.stop)()
            raise SandboxError(f"{e}\n{tail(self.log_path, log_lines)}") from None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise SandboxError(
                f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n{tail(self.log_path)}"
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        with _live_lock:
            _live.discard(self)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL now (a crash, as far as the daemon's on-disk state is concerned)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        with _live_lock:
            _live.discard(self)


class RunsDaemon:
    """A sandbox component run as one ``Daemon`` (``_daemon``: None until it is started)."""

    _daemon: Daemon | None = None

    @property
    def pid(self) -> int | None:
        return self._daemon.pid if self._daemon else None

    @property
    def running(self) -> bool:
        return self._daemon is not None and self._daemon.running


def kill_tree(pids: Sequence[int], timeout: float = 5.0) -> list[int]:
    """Kill the given PIDs and all their descendants (SIGTERM, then SIGKILL). Returns what was signalled."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs.extend(p.children(recursive=True))
            procs.append(p)
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in procs]


def pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (a private temp path, never a program name)."""
    if len(text) < 8 or "/" not in text:
        raise ValueError(f"{text!r}: too broad to match processes by")
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.info["pid"] != me and any(text in part for part in cmd):
            found.append(p.info["pid"])
    return found


def wait_until(what: str, check: object, timeout: float, interval: float = 0.1) -> None:
    """Poll ``check()`` until it returns truthy; raise SandboxError naming ``what`` on timeout."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except SandboxError:
            raise
        except Exception as e:
            last = e
        time.sleep(interval)
    raise SandboxError(f"{what}: not ready after {timeout:g}s" + (f" (last error: {last})" if last else ""))


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live)
    for d in leftovers:
        d.stop(timeout=3)
