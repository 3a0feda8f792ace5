"""`asrops data`: labelled datasets kept in the registry (asrops/registry/datasets.py), so the
sets a retrain is judged on travel with the models to a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from asrops.cli.common import say, setup

app = typer.Typer(no_args_is_help=True, help="Import and list labelled datasets kept in the registry.")


@app.command("import")
def data_import(
    manifest: Annotated[Path, typer.Argument(help="A clip manifest (JSON Lines with audio and text).",
                                             exists=True, dir_okay=False)],
    name: Annotated[str, typer.Option(help="The dataset's name, e.g. golden; settings then say registry:NAME.")],
    core_english: Annotated[bool, typer.Option(
        help="Keep only the speech data README's core English subset (gold references, 1-30 s).")] = False,
) -> None:
    """Copy a manifest's clips into the registry as an immutable, checksummed dataset version."""
    from asrops.evaluation import core_english_filter
    from asrops.registry.datasets import DatasetStore

    settings = setup()
    dataset = DatasetStore.from_settings(settings).import_manifest(
        manifest, name, keep=core_english_filter if core_english else None, progress=say)
    typer.echo(f"registry:{dataset.id}")


@app.command("list")
def data_list(name: Annotated[Optional[str], typer.Argument(help="Only this dataset's versions.")] = None) -> None:
    """Every dataset version in the registry, oldest first."""
    from asrops.registry.datasets import DatasetStore

    settings = setup()
    versions = DatasetStore.from_settings(settings).list(name)
    if not versions:
        say(f"no datasets in {settings.registry_uri}; add one with `asrops data import MANIFEST --name NAME`")
        return
    typer.echo(f"{'DATASET':40} {'CREATED (UTC)':20} {'CLIPS':>6} {'SIZE':>9}  SOURCE")
    for d in versions:
        size = sum(f.size for f in d.files) / 1e6
        typer.echo(f"{d.id:40} {d.created_at:%Y-%m-%d %H:%M:%S} {d.rows:6d} {size:7.1f}MB  {d.source}")
