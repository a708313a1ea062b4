"""Flower ServerApp: a thin adapter that runs :func:`fed_ndif.server.federation.run_federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_ndif.run_config import from_run_config
from fed_ndif.server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, from_run_config(context.run_config))
