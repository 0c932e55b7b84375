"""The one subprocess wrapper: no shell, bounded time, clear errors that never echo stdin."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class CommandError(RuntimeError):
    pass


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> Result:
    """Run ``argv`` (no shell). ``stdin`` may hold secrets: it never appears in an error."""
    try:
        cp = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except FileNotFoundError:
        raise CommandError(f"{argv[0]}: not found") from None
    except PermissionError:
        raise CommandError(f"{argv[0]}: not executable") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"{argv[0]}: timed out after {timeout:g}s") from None
    if check and cp.returncode != 0:
        tail = cp.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise CommandError(f"{argv[0]}: exit {cp.returncode}: {tail[0][:300]}")
    return Result(cp.returncode, cp.stdout, cp.stderr)
