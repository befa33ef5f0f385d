"""Flower ServerApp: parse the run config once, then run the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation
from shared.config import parse_run_config
from shared.logs import use_flower_handlers

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point: a bad run config fails here, before round 1."""
    use_flower_handlers()
    cfg = parse_run_config(context.run_config)
    run_federation(grid, cfg)
