"""`asrops serve`: the whole service on one machine (what it starts: asrops/cli/stack.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from asrops.cli.common import setup


def serve_command(
    config: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False,
        help="A Serve config file (serve deploy schema), e.g. serve/serve_config.yaml.")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default: settings, 8000).")] = None,
) -> None:
    """Run the transcription service locally: Ray, Serve, the stable model and the HTTP API,
    with the drift monitor, the promotion controller and a local Prometheus beside it."""
    from asrops.cli.stack import run_service

    settings = setup()
    if port:
        settings.serve.port = port
    run_service(settings, config)
