"""What ``nodeagent prefetch`` prints: a live per-image view on a terminal (``TtyProgress``), one line
per event otherwise (``LineProgress``: Packer, journald), and the summary table at the end."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from nodeagent.images.prefetch import OK_RESULTS, PENDING, ImageOutcome, PrefetchReport
from nodeagent.util import humanize


def human_size(n: int) -> str:
    return humanize.size(n) if n > 0 else "-"


def short_digest(d: str) -> str:
    return d[:19] if d else "-"  # sha256: + 12 hex


def result_text(o: ImageOutcome) -> str:
    if o.ok:
        return o.result
    return f"FAILED {o.result}" + (" (required)" if o.required else "")


def format_summary(report: PrefetchReport) -> str:
    """The table printed at the end: image, digest, size, time, result (+ the errors below it)."""
    header = ("IMAGE", "DIGEST", "SIZE", "TIME", "RESULT")
    rows = [
        (o.image, short_digest(o.digest), human_size(o.size), f"{o.seconds:.1f}s", result_text(o))
        for o in report.outcomes
    ]
    lines = humanize.table(header, rows)
    for o in report.outcomes:
        if not o.ok and o.error:
            lines.append(f"  {o.image}: {o.result}: {o.error}")
    counts = report.counts()
    parts = [f"{counts[k]} {k}" for k in sorted(counts, key=lambda k: (k not in OK_RESULTS, k))]
    missing = report.missing_required
    tail = f"; {len(missing)} required image(s) missing" if missing else ""
    budget = "; budget spent" if report.budget_spent else ""
    total = f"prefetch: {len(report.outcomes)} image(s): {', '.join(parts)}"
    lines.append(f"{total} in {report.seconds:.1f}s{budget}{tail}")
    return "\n".join(lines)


class LineProgress:
    """One line per event (Packer logs, journald): ``[  1.2s] IMAGE: state detail``."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self._clock = clock
        self._t0 = clock()

    def _line(self, text: str) -> None:
        self.stream.write(f"[{self._clock() - self._t0:6.1f}s] {text}\n")
        self.stream.flush()

    def start(self, outcomes: Sequence[ImageOutcome]) -> None:
        self._t0 = self._clock()
        self._line(f"prefetch: {len(outcomes)} image(s)")

    def update(self, outcome: ImageOutcome, state: str, detail: str = "") -> None:
        if state == "checking" and not detail:
            return  # not an event worth a line
        if state in OK_RESULTS:
            bits = [short_digest(outcome.digest), human_size(outcome.size), f"{outcome.seconds:.1f}s"]
            detail = ", ".join(b for b in bits if b != "-")
        self._line(f"{outcome.image}: {state}" + (f" ({detail})" if detail else ""))

    def tick(self) -> None:
        pass

    def finish(self, report: PrefetchReport) -> None:
        pass


class TtyProgress:
    """A live view on a terminal: one line per image, redrawn in place."""

    SPIN = "|/-\\"

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self._clock = clock
        self._outcomes: list[ImageOutcome] = []
        self._state: dict[int, tuple[str, str]] = {}
        self._drawn = 0
        self._frame = 0

    def start(self, outcomes: Sequence[ImageOutcome]) -> None:
        self._outcomes = list(outcomes)
        self._state = {id(o): ("waiting", "") for o in outcomes}
        self._draw()

    def update(self, outcome: ImageOutcome, state: str, detail: str = "") -> None:
        self._state[id(outcome)] = (state, detail)
        self._draw()

    def tick(self) -> None:
        self._frame += 1
        self._draw()

    def finish(self, report: PrefetchReport) -> None:
        self._draw()

    def _text(self, o: ImageOutcome) -> str:
        state, detail = self._state.get(id(o), ("waiting", ""))
        if state in OK_RESULTS:
            mark, what = "✓", f"{state} {short_digest(o.digest)} {human_size(o.size)} {o.seconds:.1f}s"
        elif o.result not in (PENDING,) and state == o.result:
            mark, what = "✗", f"{state}: {detail}" if detail else state
        elif state == "waiting":
            mark, what = " ", "waiting"
        else:
            elapsed = self._clock() - o.started if o.started is not None else 0.0
            mark = self.SPIN[self._frame % len(self.SPIN)]
            what = f"{state} {elapsed:.1f}s" + (f" ({detail})" if detail else "")
        return f"{mark} {o.image}  {what}"

    def _draw(self) -> None:
        cols, rows = shutil.get_terminal_size((120, 40))
        width = max(20, cols - 1)  # a wrapped line would break the redraw
        outcomes = self._outcomes
        budget = max(3, rows - 2)
        lines: list[str]
        if len(outcomes) <= budget:
            lines = [self._text(o) for o in outcomes]
        else:  # more images than rows: the ones still in progress, then a count of the rest
            busy = [o for o in outcomes if o.result == PENDING]
            done = len(outcomes) - len(busy)
            shown = busy[: budget - 1]
            lines = [self._text(o) for o in shown]
            lines.append(f"  ... {done} done, {len(busy) - len(shown)} more in progress or waiting")
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")  # back to the first line of the view
        out.extend("\x1b[2K" + line[:width] + "\n" for line in lines)
        out.append("\x1b[J")  # clear anything left below from a taller view
        self._drawn = len(lines)
        self.stream.write("".join(out))
        self.stream.flush()
