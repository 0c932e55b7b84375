"""Run every ``bench/bench_*.py`` (or those named on the command line) and report which met target.

python -m bench                 # all
python -m bench validate        # bench/bench_validate.py only
python -m bench --plot          # PNG charts of the latest result files (bench/plot.py), no benchmark run
python -m bench mirrorhealth --plot   # run, then chart
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if "--plot" in argv:
        argv = [a for a in argv if a != "--plot"]
        rc = main(argv) if argv else 0
        from bench import plot

        plotted = plot.main([])
        return rc or plotted
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    wanted = [a if a.startswith("bench_") else f"bench_{a}" for a in argv]
    if wanted:
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"no such benchmark: {', '.join(unknown)} (have: {', '.join(names)})", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    results: dict[str, int] = {}
    for name in names:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        module = importlib.import_module(f"bench.{name}")
        results[name] = int(module.main([]))
        verdict = "ok" if results[name] == 0 else "MISSED TARGET"
        print(f"== {name}: {verdict} ({time.monotonic() - started:.1f}s)\n")
    failed = [n for n, rc in results.items() if rc]
    print(
        f"{len(results) - len(failed)}/{len(results)} benchmarks met their target"
        + (f"; missed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
