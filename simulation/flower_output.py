"""Reading Flower's streamed output: which lines are meant for the person running medfed.

``flwr run --stream`` mixes, line by line, Flower's own logs (strategy
banners, ``Aggregated MetricRecord`` dicts, the final-results dump), Ray's
(``(ClientAppActor pid=...)`` prefixes, FutureWarnings) and medfed's. The
server and the sites tag what a person should see with
:data:`shared.console.TAG` (``[medfed] round 2/3: ...``, ``[medfed] site:
...``, ``[medfed] warning: ...``, ``[medfed] summary: ...``).
:func:`read_console_line` picks those out of a raw line, after removing
Flower's level prefix, ANSI colours and Ray's actor prefix and
``[repeated Nx across cluster]`` suffix. It also reads the untagged
``[round N/M] ...`` progress lines of servers that predate the tags.
"""

from __future__ import annotations

import re

from shared.console import ConsoleLine, parse_console_line

__all__ = ["read_console_line", "strip_ansi"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RAY_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
_LEGACY_ROUND = re.compile(r"\[round (\d+)/(\d+)\] (.*)$")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI colour and cursor codes."""
    return _ANSI.sub("", text)


def read_console_line(raw: str) -> ConsoleLine | None:
    """The part of one raw output line meant for a person, or ``None`` for Flower/Ray internals.

    Parameters
    ----------
    raw:
        One line as ``flwr run --stream`` printed it (colours, prefixes and
        the trailing newline included).

    Returns
    -------
    ConsoleLine or None
        A tagged line parsed by :func:`shared.console.parse_console_line`;
        for an untagged legacy progress line ``[round N/M] text``, a
        ``round`` line with that counter; otherwise ``None``.
    """
    line = _RAY_REPEATED.sub("", strip_ansi(raw).rstrip("\r\n"))
    tagged = parse_console_line(line)
    if tagged is not None:
        return tagged
    legacy = _LEGACY_ROUND.search(line)
    if legacy is None:
        return None
    return ConsoleLine(kind="round", text=legacy.group(3), round=int(legacy.group(1)),
                       num_rounds=int(legacy.group(2)))
