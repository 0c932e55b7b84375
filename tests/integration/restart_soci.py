"""soci-snapshotter "service manager" for the SOCI integration tests: ``containerd.soci.restartCommand``.

    python restart_soci.py PIDFILE LOG SOCKET -- SOCI-SNAPSHOTTER-GRPC [ARGS...]

Stops the soci-snapshotter-grpc whose PID is in PIDFILE (SIGTERM, then SIGKILL after 10 s), removes
a stale SOCKET, starts the command in its own session with output appended to LOG and writes the
new PID to PIDFILE, as ``systemctl restart soci-snapshotter`` does for the unit. The test tears
down by that PID.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from restart_containerd import stop  # the same stop (run as a script: its directory is on sys.path)


def main(argv: list[str]) -> int:
    sep = argv.index("--")
    pidfile, log, sock = Path(argv[0]), Path(argv[1]), Path(argv[2])
    cmd = argv[sep + 1 :]
    stop(pidfile)
    if sock.exists():
        sock.unlink()
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    pidfile.write_text(str(p.pid))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
