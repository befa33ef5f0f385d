"""The lines medfed shows a person, told apart from Flower's and Ray's own output.

Server and sites log through Flower's handlers, so everything reaches the
``flwr run --stream`` output mixed with Flower and Ray internals. A line meant
for the person running medfed carries :data:`TAG` followed by its kind::

    [medfed] header: pneumonia-cxr with small-cnn, fedavg, 3 rounds, 3 sites
    [medfed] [round 2/3] train loss 0.599 | val AUROC 0.816 ...
    [medfed] site: site-0 train 320 [160, 160], validation 80 [40, 40]
    [medfed] warning: site-2 has only 11 training images
    [medfed] summary: finished 3 rounds in 48 s; final pooled validation AUROC 0.843 ...

``medfed simulate`` shows only these lines (a progress bar for ``round`` lines
on a terminal) and writes the full output to ``flower.log``; ``--verbose``
shows everything. :func:`parse_console_line` is the reading side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["KINDS", "TAG", "ConsoleLine", "console_line", "parse_console_line"]

TAG = "[medfed]"
KINDS = ("header", "round", "site", "warning", "summary")
"""What a tagged line is: the run's header, one round's progress, a site's data
(once per run), a warning a person must see, the final summary."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LINE = re.compile(r"\[medfed\] (?:(header|site|warning|summary): |\[(round) (\d+)/(\d+)\] )(.*)$")


@dataclass(frozen=True)
class ConsoleLine:
    """One tagged line, parsed: its kind, the round counter of ``round`` lines, and the text."""

    kind: str
    text: str
    round: int | None = None
    num_rounds: int | None = None


def console_line(kind: str, text: str, *, round: int | None = None, num_rounds: int | None = None) -> str:
    """Format a line for the person running medfed (log it at INFO or WARNING).

    Parameters
    ----------
    kind:
        One of :data:`KINDS`.
    text:
        What to show; a single line.
    round, num_rounds:
        For ``kind="round"``: this round and the planned number of rounds.
    """
    if kind not in KINDS:
        raise ValueError(f"console line kind must be one of {KINDS}, got {kind!r}")
    text = " ".join(text.splitlines())
    if kind == "round":
        if round is None or num_rounds is None:
            raise ValueError("a round line needs round and num_rounds")
        return f"{TAG} [round {round}/{num_rounds}] {text}"
    return f"{TAG} {kind}: {text}"


def parse_console_line(raw: str) -> ConsoleLine | None:
    """The tagged part of one output line (Flower's prefix and colours removed), or ``None``."""
    line = _ANSI.sub("", raw).rstrip("\r\n")
    m = _LINE.search(line)
    if m is None:
        return None
    kind, round_kind, r, n, text = m.groups()
    if round_kind:
        return ConsoleLine(kind="round", text=text, round=int(r), num_rounds=int(n))
    return ConsoleLine(kind=kind, text=text)
