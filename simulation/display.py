"""Showing a running simulation to a person: the tagged lines only.

:class:`RunDisplay` receives every raw line of Flower's streamed output
(:meth:`RunDisplay.feed`) and shows only what :func:`read_console_line`
marks for a person; the runner writes everything to ``flower.log``.

* On a terminal, ``round`` lines drive a progress bar (``rich``): spinner,
  round counter, bar, elapsed time and the round's text; each finished
  round's line also stays printed above the bar. Other tagged lines are
  printed above the bar as they come, warnings highlighted.
* Elsewhere (logs, CI, tests, pipes), every tagged line is one plain line:
  ``[round 2/3] <text>``, the header and summary as they are, site lines
  indented, ``warning: <text>`` on stderr.

A line repeated verbatim (Ray replays, a warning sent every round) is shown once.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TextIO

from shared.console import ConsoleLine
from simulation.flower_output import read_console_line

__all__ = ["RunDisplay", "format_line", "library_logs_hidden"]

RECENT = 5
"""Tagged lines kept in :attr:`RunDisplay.recent`."""


def format_line(line: ConsoleLine) -> str:
    """One tagged line as plain text for a person.

    ``round`` -> ``[round 2/3] <text>`` (the form medfed has always printed),
    ``site`` -> indented text, ``warning`` -> ``warning: <text>``,
    ``header`` and ``summary`` -> the text itself.
    """
    if line.kind == "round":
        counter = f" {line.round}/{line.num_rounds}" if line.round is not None and line.num_rounds is not None else ""
        return f"[round{counter}] {line.text}"
    if line.kind == "site":
        return f"  {line.text}"
    if line.kind == "warning":
        return f"warning: {line.text}"
    return line.text


class RunDisplay:
    """Shows one run's tagged lines, plain or as a progress bar; use as a context manager.

    Parameters
    ----------
    num_rounds:
        Planned rounds (the bar's length); learnt from the first ``round``
        line when ``None``.
    out, err:
        Streams for the lines and for warnings (default stdout, stderr).
    live:
        Progress bar (True) or plain lines (False); default: whether ``out``
        is a terminal.
    indent:
        Prefix of every plain line (e.g. the runs of a study).
    """

    def __init__(self, *, num_rounds: int | None = None, out: TextIO | None = None, err: TextIO | None = None,
                 live: bool | None = None, indent: str = "") -> None:
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.live = _isatty(self.out) if live is None else live
        self.indent = indent
        self.num_rounds = num_rounds
        self.recent: deque[ConsoleLine] = deque(maxlen=RECENT)
        self.saw_summary = False
        self.rounds_done = 0
        self._seen: set[tuple[str, int | None, str]] = set()
        self._progress: Any = None
        self._task: Any = None

    # -- context ---------------------------------------------------------

    def __enter__(self) -> RunDisplay:
        if self.live:
            self._start_bar()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- input -----------------------------------------------------------

    def feed(self, raw: str) -> None:
        """Take one raw output line; show it when it is meant for a person."""
        line = read_console_line(raw)
        if line is not None:
            self.show(line)

    def show(self, line: ConsoleLine) -> None:
        """Show one tagged line (once: verbatim repeats are dropped)."""
        key = (line.kind, line.round, line.text)
        if key in self._seen:
            return
        self._seen.add(key)
        self.recent.append(line)
        if line.kind == "summary":
            self.saw_summary = True
        if line.kind == "round":
            self.rounds_done = max(self.rounds_done, line.round or self.rounds_done + 1)
            if line.num_rounds:
                self.num_rounds = line.num_rounds
        if self._progress is not None:
            self._show_live(line)
        else:
            self._show_plain(line)

    # -- output ----------------------------------------------------------

    def _show_plain(self, line: ConsoleLine) -> None:
        stream = self.err if line.kind == "warning" else self.out
        print(self.indent + format_line(line), file=stream, flush=True)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Column

        console = Console(file=self.out, force_terminal=True, highlight=False, markup=False)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.fields[counter]}", markup=False),
            BarColumn(bar_width=24),
            TimeElapsedColumn(),
            TextColumn("{task.description}", markup=False,
                       table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=console, transient=True, expand=True,
        )
        self._task = self._progress.add_task(
            "starting Flower and the simulated sites (the first round includes starting Ray)",
            total=self.num_rounds, counter=self._counter())
        self._progress.start()

    def _counter(self) -> str:
        return f"round {self.rounds_done}/{self.num_rounds if self.num_rounds else '?'}"

    def _show_live(self, line: ConsoleLine) -> None:
        from rich.text import Text

        style = "bold yellow" if line.kind == "warning" else ("bold" if line.kind in ("header", "summary") else "")
        self._progress.console.print(Text(self.indent + format_line(line), style=style), soft_wrap=True)
        if line.kind == "round":
            self._progress.update(self._task, completed=self.rounds_done, total=self.num_rounds,
                                  counter=self._counter(), description=line.text)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def library_logs_hidden(level: int = logging.ERROR) -> Iterator[None]:
    """Show only ``level`` and above of the console's log handlers while an in-process run shows its own lines.

    A simulation's library logging goes to ``flower.log`` in its Flower
    processes; an in-process run (``medfed simulate --baseline``) logs in this
    process, to its own log file, and shows a person only its tagged lines.
    Handlers writing to stdout/stderr get ``level`` for the duration (restored after).
    """
    root = logging.getLogger()
    handlers = [h for h in root.handlers
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)]
    saved = [(h, h.level) for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, level))
    try:
        yield
    finally:
        for h, old in saved:
            h.setLevel(old)
