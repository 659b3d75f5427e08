"""Progress of long commands on stderr: a bar redrawn in place on a terminal, plain lines anywhere else.

When stderr is a terminal, a tqdm bar redraws there. When it is not (`make demo > log 2>&1`, a pipe, `kubectl
logs`), a redrawn bar would fill the log with carriage-return lines, so the same progress comes as plain lines
instead: one per `log(figures)` call (the trainer calls it every train.log_every steps, with the figures the bar
shows), one at most every `interval_s` seconds between them, and one at the end. Progress never goes to stdout,
which holds a command's results (tables, --json).

    line:  "train tiny: 200/3200 steps (6%), 4.1 steps/s, eta 12m10s | loss 0.0123 step_s 0.243 ..."
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts `unit`s towards `total`. `enabled=False` shows nothing (e.g. on ranks other than 0)."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 interval_s: float | None = 30.0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled, self.interval_s = enabled, interval_s
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit) if enabled and interactive() else None
        self.start = self.last_line = time.monotonic()
        self.start_n = self.line_n = initial  # done at the start, and at the last plain line
        self.figures: dict[str, str] = {}

    def update(self, count: int = 1, figures: dict[str, str] | None = None) -> None:
        """`count` more done; `figures`, when given, replace the figures shown (the bar's postfix, or the next
        plain line's tail) without printing a line of their own."""
        self.n += count
        if figures is not None:
            self.figures = figures
        if self.bar is not None:
            self.bar.update(count)
            if figures is not None:
                self.bar.set_postfix(figures, refresh=False)
        elif self.enabled and self.interval_s is not None and time.monotonic() - self.last_line >= self.interval_s:
            self.print_line()

    def log(self, figures: dict[str, str]) -> None:
        """New figures to show: the bar's postfix, or a plain line now."""
        self.figures = figures
        if self.bar is not None:
            self.bar.set_postfix(figures)
        elif self.enabled:
            self.print_line()

    def write(self, line: str) -> None:
        """A line of its own (validation's figures), above the bar or among the plain lines."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def print_line(self) -> None:
        now = time.monotonic()
        self.last_line, self.line_n = now, self.n
        units = plural(self.unit)
        done = f"{self.n}/{self.total} {units} ({self.n / self.total:.0%})" if self.total else f"{self.n} {units}"
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        parts = [f"{self.desc}: {done}", f"{rate:.3g} {units}/s"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {duration((self.total - self.n) / rate)}")
        figures = " ".join(f"{k} {v}" for k, v in self.figures.items())
        print(", ".join(parts) + (f" | {figures}" if figures else ""), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n != self.line_n:
            self.print_line()
        self.enabled = False  # a second close prints nothing

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True):
    """Iterates `iterable`, showing its progress (a bar or plain lines, see the module docstring)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, unit, enabled=enabled) as progress:
        for item in iterable:
            yield item
            progress.update()
