"""`asrops k8s`: the Kubernetes manifests (k8s/): render an overlay, regenerate the parts that
come from the code, name the images, and make the local overlay's buckets."""

from __future__ import annotations

from typing import Annotated

import typer

from asrops.cli.common import say, setup

app = typer.Typer(no_args_is_help=True, help="Kubernetes (KubeRay) manifests: render, generate, images.")

OVERLAY_HELP = "cpu, gpu or local (k8s/overlays/)."


@app.command("render")
def render_command(
    overlay: Annotated[str, typer.Option(help=OVERLAY_HELP)] = "cpu",
) -> None:
    """Print an overlay's manifests (`kubectl kustomize`), with the generated parts fresh from the
    code: `asrops k8s render --overlay gpu | kubectl apply -f -`."""
    from asrops.k8s.render import OVERLAYS, KubectlMissing, render

    if overlay not in OVERLAYS:
        raise typer.BadParameter(f"{overlay!r}: choose one of {', '.join(OVERLAYS)}", param_hint="--overlay")
    try:
        typer.echo(render(overlay), nl=False)
    except (KubectlMissing, FileNotFoundError, RuntimeError) as exc:
        say(str(exc))
        raise typer.Exit(1) from None


@app.command("generate")
def generate_command(
    check: Annotated[bool, typer.Option(help="Write nothing; fail when a checked-in copy is stale.")] = False,
) -> None:
    """Rewrite the generated files (serve/serve_config.yaml, k8s/components/*) from the code."""
    from asrops.k8s.render import CHECKOUT, stale, write

    try:
        changed = stale() if check else write()
    except FileNotFoundError as exc:
        say(str(exc))
        raise typer.Exit(1) from None
    for path in changed:
        say(f"{'stale' if check else 'wrote'}: {path.relative_to(CHECKOUT)}")
    if check and changed:
        say("run `asrops k8s generate` and commit the result")
        raise typer.Exit(1)
    if not changed:
        say("generated files are up to date")


@app.command("image")
def image_command(
    variant: Annotated[str, typer.Argument(help="cpu or cuda (k8s/images/Dockerfile.<variant>).")] = "cpu",
) -> None:
    """Print the image name and tag the manifests use: `docker build -t "$(asrops k8s image cpu)" ...`."""
    from asrops.k8s.render import pins

    try:
        typer.echo(pins().image(variant))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    except FileNotFoundError as exc:
        say(str(exc))
        raise typer.Exit(1) from None


@app.command("ensure-buckets")
def ensure_buckets_command(
    timeout_s: Annotated[float, typer.Option(help="How long to wait for the object store to answer.")] = 300.0,
) -> None:
    """Create the S3 buckets of the registry and the production log when missing (the local
    overlay runs it before the registry is seeded)."""
    from asrops.k8s.buckets import ensure_buckets

    ensure_buckets(setup(), timeout_s, say)
