"""`asrops models`: list, inspect and import model versions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from asrops.cli.common import registry_of, say, setup

app = typer.Typer(no_args_is_help=True, help="List, inspect and import model versions.")


@app.command("list")
def models_list() -> None:
    """List published versions and which aliases point at them."""
    settings = setup()
    registry = registry_of(settings)
    aliases = registry.read_aliases().value.model_dump()
    versions = registry.list_versions()
    if not versions:
        say(f"no versions in {settings.registry_uri}; run `asrops models import-default`")
        return
    typer.echo(f"{'VERSION':44} {'FAMILY':18} {'CREATED (UTC)':20} {'SIZE':>9}  ALIASES")
    for m in versions:
        names = ",".join(k for k, v in aliases.items() if v == m.id)
        size = sum(f.size for f in m.files) / 1e6
        typer.echo(f"{m.id:44} {m.family:18} {m.created_at:%Y-%m-%d %H:%M:%S}  {size:7.0f}MB  {names}")


@app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="Version id or alias (stable, canary, fallback).")]) -> None:
    """Print a version's manifest as JSON."""
    settings = setup()
    typer.echo(registry_of(settings).get_manifest(name).model_dump_json(indent=2))


@app.command("import")
def models_import(
    source: Annotated[str, typer.Argument(
        help="Local transformers Whisper checkpoint directory, or a hub id (needs network).")],
    family: Annotated[Optional[str], typer.Option(help="Model family name; default: the directory name.")] = None,
    alias: Annotated[Optional[str], typer.Option(
        help="Point this alias (stable, canary, fallback) at the new version.")] = None,
    parent: Annotated[Optional[str], typer.Option(help="Parent version id, if fine-tuned from one.")] = None,
    notes: Annotated[str, typer.Option(help="Free-text notes stored in the manifest.")] = "",
) -> None:
    """Import a Whisper checkpoint: export ONNX (fp32 and int8) and publish a new version."""
    import tempfile

    from asrops.models.importer import publish_checkpoint, resolve_checkpoint_source

    settings = setup()
    with tempfile.TemporaryDirectory(prefix="asrops-download-") as tmp:
        checkpoint = resolve_checkpoint_source(source, Path(tmp))
        manifest = publish_checkpoint(
            registry_of(settings),
            checkpoint,
            family=family or Path(source.rstrip("/")).name.replace("/", "-").lower(),
            source=source,
            parent=parent,
            alias=alias,
            notes=notes,
            progress=say,
        )
    typer.echo(manifest.id)


@app.command("import-default")
def models_import_default() -> None:
    """Publish the embedded Whisper tiny.en as `stable` (does nothing if a stable exists)."""
    from asrops.models.importer import import_embedded_default

    settings = setup()
    typer.echo(import_embedded_default(registry_of(settings), progress=say).id)
