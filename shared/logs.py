"""Route medfed's loggers through Flower's log handlers.

Inside ``flwr run``/SuperNode processes only Flower's logger (``"flwr"``) is
wired to the console and the streamed run log. Calling
:func:`use_flower_handlers` makes our own loggers print there too, without
importing Flower here (the logger is looked up by name).
"""

from __future__ import annotations

import logging

MEDFED_LOGGERS = ("shared", "server", "client", "simulation")


def use_flower_handlers(level: int = logging.INFO) -> None:
    """Attach the ``flwr`` logger's handlers to medfed's loggers (idempotent)."""
    flwr_logger = logging.getLogger("flwr")
    for name in MEDFED_LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(level)
        for h in flwr_logger.handlers:
            if h not in lg.handlers:
                lg.addHandler(h)
        if lg.handlers:
            lg.propagate = False
