"""What every command shares: settings and logging set up once, progress on stderr, the registry."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from asrops.settings import Settings, load_settings

if TYPE_CHECKING:
    from asrops.engines import WhisperEngine
    from asrops.registry import ModelRegistry

EngineOpt = Annotated[Optional[str], typer.Option("--engine", help="torch, onnx or onnx-int8 (default: settings).")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="Intra-op threads; 0 = settings (0 there = all cores).")]
UrlOpt = Annotated[Optional[str], typer.Option(
    "--url", help="Base URL of the running service (default: http://127.0.0.1 on ASROPS_SERVE__PORT, 8000).")]


def setup(verbose: bool = False) -> Settings:
    """Settings from the environment, and logging: ours at their level, where every automatic
    decision (a drift verdict, a retrain, a rollout step) says what it was decided on; every
    library's at WARNING (ONNX Runtime's quantiser, for one, writes INFO lines on the root
    logger by the hundred)."""
    settings = load_settings()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger(__name__.partition(".")[0]).setLevel(  # "asrops": every module's getLogger(__name__)
        logging.DEBUG if verbose else getattr(logging, settings.log_level.upper(), logging.INFO))
    return settings


def say(message: str) -> None:
    """Progress for a person: stderr, so stdout stays the command's result."""
    typer.echo(message, err=True)


def service_url(url: str | None) -> str:
    """The given URL, or the local service's on the configured port."""
    return url or load_settings().serve.local_url


def registry_of(settings: Settings) -> ModelRegistry:
    from asrops.registry import ModelRegistry

    return ModelRegistry.from_settings(settings)


def load_engine_for(settings: Settings, version: str, engine: str | None, threads: int) -> tuple[str, WhisperEngine]:
    """A version (id or alias) fetched and verified, loaded on an engine in this process."""
    from asrops.engines import load_engine

    registry = registry_of(settings)
    version_id = registry.resolve(version)
    say(f"loading {version_id} (verifying checksums)")
    model_dir = registry.fetch(version_id)
    kind = engine or settings.engine.kind
    return version_id, load_engine(model_dir, kind, settings.engine.device, threads or settings.engine.threads)
