"""containerd "service manager" for the apply integration tests: the ``containerd.restartCommand``.

    python restart_containerd.py PIDFILE CONFIG LOG [--containerd BIN] [--fail-if-contains TEXT]

Stops the containerd whose PID is in PIDFILE (SIGTERM, then SIGKILL after 10 s), removes a stale
socket, starts ``BIN --config CONFIG`` (default ``containerd``; BIN's directory first on PATH, so a
2.x containerd finds its own shim) in its own session with output appended to LOG and
writes the new PID to PIDFILE, like ``systemctl restart containerd`` does for a unit. The test
tears down by that PID. ``--fail-if-contains`` is fault injection for the rollback test: when the
config holds TEXT, it starts ``containerd`` with an unknown flag instead (it exits at once, so CRI
never answers), as a containerd that cannot start on a bad config would. ``--containerd`` names the
binary (default: ``containerd`` from PATH, Debian's 1.6).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path


def stop(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("pidfile", type=Path)
    ap.add_argument("config", type=Path)
    ap.add_argument("log", type=Path)
    ap.add_argument("--containerd", default="containerd")
    ap.add_argument("--fail-if-contains")
    a = ap.parse_args(argv)
    pidfile, config, log, fail_text = a.pidfile, a.config, a.log, a.fail_if_contains
    stop(pidfile)
    text = config.read_text()
    doc = tomllib.loads(text)
    grpc = doc.get("grpc") or doc["plugins"]["io.containerd.server.v1.grpc"]  # version 4: a plugin
    sock = Path(grpc["address"])
    if sock.exists():
        sock.unlink()
    cmd = [a.containerd, "--config", str(config)]
    if fail_text is not None and fail_text in text:
        cmd = [a.containerd, "--no-such-flag"]
    env = dict(os.environ)
    if os.sep in a.containerd:
        env["PATH"] = f"{os.path.dirname(a.containerd)}{os.pathsep}{env.get('PATH', '')}"
    with open(log, "ab") as out:
        p = subprocess.Popen(
            cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    pidfile.write_text(str(p.pid))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
