"""``nodeagent apply`` with a pause before each write step, for the kill -9 test (test-side seam).

    python apply_fault_points.py DELAY apply --root ROOT --flavor generic

Runs nodeagent's own CLI in this process after wrapping the two functions apply writes through
(``nodeagent.apply.runner.write_atomic`` and ``remove_durably``): before each write of a config file, a
backup or a removal it prints ``fault-point N WHAT`` on stderr and sleeps DELAY seconds, so the
test can kill the process at that step or in the middle of it. The apply report (written after
every step) is not a fault point. Nothing of this is in the product.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from nodeagent.apply import runner as apply


def install(delay: float) -> None:
    n = 0
    write_atomic, remove_durably = apply.write_atomic, apply.remove_durably

    def point(what: str) -> None:
        nonlocal n
        n += 1
        print(f"fault-point {n} {what}", file=sys.stderr, flush=True)
        time.sleep(delay)

    def write(path: Path, data: bytes, **kw: Any) -> bool:
        if path.name != "apply-report.json":
            point(f"{'backup' if path.name.endswith(apply.BACKUP_SUFFIX) else 'write'} {path}")
        return write_atomic(path, data, **kw)

    def remove(path: Path) -> bool:
        point(f"remove {path}")
        return remove_durably(path)

    apply.write_atomic = write  # type: ignore[assignment]
    apply.remove_durably = remove


def main() -> int:
    install(float(sys.argv[1]))
    from nodeagent.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
