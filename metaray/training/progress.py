"""Training progress for people: a live display on a terminal, plain lines anywhere else.

Ray Job logs, CI logs and files get one line per iteration with no control codes; an
interactive terminal gets a rich progress bar that redraws in place.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

FAULT_KEYS = ("worker_failures", "worker_restarts", "task_retries", "task_timeouts")


class Progress(Protocol):
    def start(self, total: int, done: int) -> None: ...
    def update(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def _success(row: dict[str, Any]) -> str:
    """The training tasks' success rate before/after adaptation, where the family reports one."""
    pre, post = row.get("pre_success_rate"), row.get("post_success_rate")
    shown = [f"{v:.2f}" if v is not None and math.isfinite(v) else "-" for v in (pre, post)]
    return "" if shown == ["-", "-"] else f"  success {shown[0]}/{shown[1]}"


def _eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """One line per iteration, with an ETA from the mean iteration time so far."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.total = self.done = self.started = 0
        self.t0 = time.perf_counter()

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self.started, self.t0 = total, done, done, time.perf_counter()

    def update(self, row: dict[str, Any]) -> None:
        self.done = row["iteration"] + 1
        per_it = (time.perf_counter() - self.t0) / max(1, self.done - self.started)
        faults = sum(row.get(k, 0) for k in FAULT_KEYS)
        self.log(f"iter {self.done:4d}/{self.total}  pre {row['pre_return']:9.3f}  post {row['post_return']:9.3f}"
                 f"{_success(row)}  steps/s {row['env_steps_per_s']:8.0f}  {row['time_iteration_s']:.2f}s  "
                 f"eta {_eta(per_it * (self.total - self.done))}" + (f"  faults {faults}" if faults else ""))

    def message(self, text: str) -> None:
        self.log(text)

    def close(self) -> None:
        pass


class LiveProgress:
    """A rich progress bar: iteration, returns before/after adaptation, steps/s, ETA."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.console = Console(file=stream, force_terminal=True)
        self.bar = RichProgress(
            TextColumn("[bold]meta-training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("pre [cyan]{task.fields[pre]}[/]  post [green]{task.fields[post]}[/]{task.fields[success]}  "
                       "{task.fields[speed]} steps/s{task.fields[faults]}"),
            TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.task: Any = None

    def start(self, total: int, done: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, pre="-", post="-", speed="-",
                                      faults="", success="")

    def update(self, row: dict[str, Any]) -> None:
        faults = sum(row.get(k, 0) for k in FAULT_KEYS)
        self.bar.update(self.task, completed=row["iteration"] + 1, pre=f"{row['pre_return']:.3f}",
                        post=f"{row['post_return']:.3f}", success=_success(row),
                        speed=f"{row['env_steps_per_s']:,.0f}",
                        faults=f"  [red]faults {faults}[/]" if faults else "")

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.bar.stop()


def make_progress(stream: TextIO | None = None, log: Callable[[str], None] | None = None) -> Progress:
    """Live display when ``stream`` is a terminal, else plain lines through ``log``."""
    stream = stream or sys.stdout
    if stream.isatty():
        return LiveProgress(stream)
    return LineProgress(log or (lambda line: print(line, file=stream, flush=True)))
