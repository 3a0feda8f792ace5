"""`asrops rollout`: canary rollouts on a running service, through its admin API."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from asrops.cli.common import UrlOpt, service_url

app = typer.Typer(no_args_is_help=True, help="Canary rollouts on a running service, through its admin API "
                  "(token from ASROPS_ADMIN_TOKEN).")

ReasonOption = Annotated[str, typer.Option(help="Why: kept in the audit log.")]


def _admin(method: str, url: str | None, path: str, body: dict | None = None) -> dict | list:
    """One call to the admin API with the operator's token; its error message on failure."""
    import os

    import httpx

    token = os.environ.get("ASROPS_ADMIN_TOKEN", "")
    if not token:
        raise typer.BadParameter("set ASROPS_ADMIN_TOKEN to one of the service's admin tokens")
    headers = {"Authorization": f"Bearer {token}", "X-Actor": os.environ.get("USER", "cli")}
    url = service_url(url)
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"cannot reach {url}: {exc}") from None
    if r.status_code != 200:
        message = r.json().get("error", {}).get("message", r.text) if r.headers.get(
            "content-type", "").startswith("application/json") else r.text
        typer.echo(f"error {r.status_code}: {message}", err=True)
        raise typer.Exit(1)
    return r.json()


def _show(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command("status")
def rollout_status(
    url: UrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="The whole status as JSON.")] = False,
) -> None:
    """Aliases, traffic, and the promotion controller's phase, weight and last check values
    against their ranges (--json adds running versions, breakers and route counts)."""
    from asrops.promotion.state import AnalysisState, status_lines

    status = _admin("GET", url, "/admin/rollout")
    if as_json:
        _show(status)
        return
    view = status["view"]
    typer.echo(f"aliases: {view['aliases']}")
    typer.echo(f"traffic: canary {view['rollout']['canary_version']} at {view['rollout']['canary_weight']} %, "
               f"shadow {view['rollout']['shadow_share']}")
    if status.get("analysis"):
        typer.echo("\n".join(status_lines(AnalysisState.model_validate(status["analysis"]))))
    else:
        typer.echo("no rollout analysed yet")


def _analysis_action(action: str, reason: str, url: str | None) -> None:
    from asrops.promotion.state import AnalysisState, status_lines

    typer.echo("\n".join(status_lines(AnalysisState.model_validate(
        _admin("POST", url, f"/admin/rollout/{action}", {"reason": reason})))))


@app.command("pause")
def rollout_pause(reason: ReasonOption = "", url: UrlOpt = None) -> None:
    """The promotion controller stops stepping the canary (its weight stays) until resumed."""
    _analysis_action("pause", reason, url)


@app.command("resume")
def rollout_resume(reason: ReasonOption = "", url: UrlOpt = None) -> None:
    """The controller goes on; its next check is one interval later."""
    _analysis_action("resume", reason, url)


@app.command("abort")
def rollout_abort(reason: ReasonOption = "", url: UrlOpt = None) -> None:
    """End the rollout as failed and roll the canary back now."""
    _analysis_action("abort", reason, url)


@app.command("canary")
def rollout_canary(
    version: Annotated[str, typer.Argument(help="Version id (or alias) to put in front of traffic.")],
    weight: Annotated[int, typer.Option(min=0, max=100, help="Percent of traffic.")] = 0,
    shadow: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of stable traffic copied to it.")] = 0.0,
    reason: ReasonOption = "",
    url: UrlOpt = None,
) -> None:
    """Deploy a version as canary (it gets traffic once it is warm)."""
    _show(_admin("POST", url, "/admin/rollout/canary",
                 {"version": version, "weight": weight, "shadow_share": shadow, "reason": reason}))


@app.command("traffic")
def rollout_traffic(
    weight: Annotated[Optional[int], typer.Option(min=0, max=100, help="Percent of traffic.")] = None,
    shadow: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Shadow share.")] = None,
    reason: ReasonOption = "",
    url: UrlOpt = None,
) -> None:
    """Set the canary's weight and/or shadow share."""
    _show(_admin("POST", url, "/admin/rollout/traffic", {"weight": weight, "shadow_share": shadow, "reason": reason}))


@app.command("promote")
def rollout_promote(reason: ReasonOption = "", url: UrlOpt = None) -> None:
    """Canary becomes stable; the old stable becomes fallback."""
    _show(_admin("POST", url, "/admin/rollout/promote", {"reason": reason}))


@app.command("rollback")
def rollout_rollback(reason: ReasonOption = "", url: UrlOpt = None) -> None:
    """Canary traffic to 0 and its alias dropped; right after a promotion, undo it."""
    _show(_admin("POST", url, "/admin/rollout/rollback", {"reason": reason}))


@app.command("audit")
def rollout_audit(limit: int = 20, url: UrlOpt = None) -> None:
    """The latest rollout changes: when, who, why, before and after."""
    _show(_admin("GET", url, f"/admin/audit?limit={limit}"))
