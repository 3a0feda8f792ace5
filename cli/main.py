"""The `asrops` command: one Typer app; each command group lives in a module of its own and
imports what it needs only when it runs, so `asrops --help` stays fast."""

from __future__ import annotations

from typing import Annotated

import typer

from asrops import __version__
from asrops.cli import bench, controller, data, k8s, models, monitor, retrain, rollout, serve, synth, transcribe

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Versioned speech recognition: serve, watch, retrain.")

app.add_typer(models.app, name="models")
app.command("serve")(serve.serve_command)
app.command("transcribe")(transcribe.transcribe)
app.command("eval")(transcribe.eval_command)
app.add_typer(bench.app, name="bench")
app.command("synth")(synth.synth)
app.add_typer(rollout.app, name="rollout")
app.command("monitor")(monitor.monitor)
app.command("controller")(controller.controller)
app.add_typer(monitor.drift_app, name="drift")
app.command("simulate")(monitor.simulate)
app.add_typer(retrain.app, name="retrain")
app.add_typer(k8s.app, name="k8s")
app.add_typer(data.app, name="data")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"asrops {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version.")] = False,
) -> None:
    """asrops: versioned speech recognition with canary routing, drift monitoring and retraining."""


if __name__ == "__main__":
    app()
