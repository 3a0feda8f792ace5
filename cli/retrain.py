"""`asrops retrain`: start, run and list retrains."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from asrops.cli.common import say, setup

app = typer.Typer(no_args_is_help=True, help="Retrain the stable version on new labelled data (Ray Train).")


@app.command("start")
def retrain_start(
    reason: Annotated[str, typer.Option(help="Why: kept with the job and the version it publishes.")] = "by hand",
    address: Annotated[Optional[str], typer.Option(
        help="Ray dashboard address (default RAY_ADDRESS or the local one).")] = None,
) -> None:
    """Start a retrain by hand: submitted as a Ray job to the running cluster (one at a time)."""
    from datetime import UTC, datetime

    from asrops.retrain.trigger import TriggerInputs, decide, jobs_address, retrain_jobs, submit_retrain

    settings = setup()
    address = jobs_address(settings.retrain.trigger, address)
    running = any(j.status in ("PENDING", "RUNNING") for j in retrain_jobs(address))
    decision = decide(TriggerInputs(now=datetime.now(UTC), manual=True, job_running=running), settings.retrain.trigger)
    say(decision.log_message())
    if not decision.start:
        raise typer.Exit(1)
    typer.echo(submit_retrain(decision.cause, reason, address))


@app.command("run")
def retrain_run(
    cause: Annotated[str, typer.Option(help="What started it: manual, drift, feedback_wer or schedule.")] = "manual",
    reason: Annotated[str, typer.Option(help="Why, in words.")] = "by hand",
) -> None:
    """Run one retrain in this process (what a retrain Ray job runs): data, fine-tuning,
    evaluation gate, and publish + canary when it passes."""
    import ray

    from asrops.raycluster import init_ray
    from asrops.retrain.job import run_retrain

    settings = setup()
    init_ray(settings)  # inside a Ray job: joins its cluster
    outcome = run_retrain(settings, cause, reason, say, gpus_available=ray.cluster_resources().get("GPU", 0) > 0)
    typer.echo(outcome.model_dump_json(indent=1))
    if not outcome.passed:
        raise typer.Exit(2)


@app.command("status")
def retrain_status(address: Annotated[Optional[str], typer.Option(help="Ray dashboard address.")] = None) -> None:
    """Retrain jobs the cluster knows, with their states."""
    from asrops.retrain.trigger import jobs_address, retrain_jobs

    settings = setup()
    for job in retrain_jobs(jobs_address(settings.retrain.trigger, address)):
        typer.echo(job.model_dump_json())
