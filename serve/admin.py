"""The admin API: rollout status and changes, behind admin tokens (separate from client keys).

Every change is a function of `asrops.promotion.rollout` (compare-and-swap plus an audit entry); this
module only checks the token and maps the request. A concurrent change loses with 409.
(No `from __future__ import annotations` here: FastAPI must see the `Actor` dependency.)
"""


from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, Field

from asrops.promotion import rollout
from asrops.promotion.state import AnalysisState
from asrops.registry import ModelRegistry
from asrops.serve.auth import ClientKeys
from asrops.serve.errors import ADMIN_DISABLED, UNAUTHORIZED, ApiError, install_error_handlers


class CanaryRequest(BaseModel):
    version: str
    weight: int = Field(default=0, ge=0, le=100)
    shadow_share: float = Field(default=0.0, ge=0.0, le=1.0)
    reason: str = ""


class TrafficRequest(BaseModel):
    weight: int | None = Field(default=None, ge=0, le=100)
    shadow_share: float | None = Field(default=None, ge=0.0, le=1.0)
    reason: str = ""


class ReasonRequest(BaseModel):
    reason: str = ""


class RolloutStatus(BaseModel):
    view: rollout.RolloutView
    serving: dict
    """What the ingress sees and counts: running versions, breakers, routes, fallbacks."""
    analysis: AnalysisState | None = None
    """The promotion controller's state: phase, weight, failed checks, last check values."""


def build_admin(registry: ModelRegistry, admin_tokens: list[str], serving: Callable[[], dict]) -> APIRouter:
    tokens = ClientKeys.from_plain(admin_tokens)

    def actor(request: Request) -> str:
        if not tokens.enabled:
            raise ApiError(ADMIN_DISABLED, "The admin API is off: no admin token is configured "
                           "(set ASROPS_SERVE__ADMIN_TOKENS).")
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not tokens.check(token):
            raise ApiError(UNAUTHORIZED, "Missing or invalid admin token. Send 'Authorization: Bearer <admin token>'.",
                           headers={"WWW-Authenticate": "Bearer"})
        name = request.headers.get("x-actor", "").strip()[:100]
        return f"{name or 'admin'} (token {ClientKeys.client_id(token)[:8]})"

    Actor = Annotated[str, Depends(actor)]
    router = APIRouter(prefix="/admin", tags=["admin"])

    # Plain `def` endpoints: registry calls block, so FastAPI runs them in its thread pool.
    @router.get("/rollout", response_model=RolloutStatus)
    def status(_: Actor):
        return RolloutStatus(view=rollout.current(registry), serving=serving(),
                             analysis=rollout.read_analysis(registry))

    @router.get("/audit", response_model=list[rollout.AuditEntry])
    def audit(_: Actor, limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        return rollout.read_audit(registry, limit)

    @router.post("/rollout/canary", response_model=rollout.AuditEntry)
    def canary(body: CanaryRequest, who: Actor):
        return rollout.deploy_canary(registry, body.version, body.weight, body.shadow_share, who, body.reason)

    @router.post("/rollout/traffic", response_model=rollout.AuditEntry)
    def traffic(body: TrafficRequest, who: Actor):
        return rollout.set_traffic(registry, body.weight, body.shadow_share, who, body.reason)

    @router.post("/rollout/promote", response_model=rollout.AuditEntry)
    def promote(body: ReasonRequest, who: Actor):
        return rollout.promote(registry, who, body.reason)

    @router.post("/rollout/rollback", response_model=rollout.AuditEntry)
    def rollback(body: ReasonRequest, who: Actor):
        return rollout.rollback(registry, who, body.reason)

    @router.post("/rollout/pause", response_model=AnalysisState)
    def pause(body: ReasonRequest, who: Actor):
        return rollout.pause(registry, who, body.reason)

    @router.post("/rollout/resume", response_model=AnalysisState)
    def resume(body: ReasonRequest, who: Actor):
        return rollout.resume(registry, who, body.reason)

    @router.post("/rollout/abort", response_model=AnalysisState)
    def abort(body: ReasonRequest, who: Actor):
        return rollout.abort(registry, who, body.reason)

    return router


def build_admin_app(router: APIRouter, retry_after_s: int) -> FastAPI:
    """The admin API alone, for its own port (`serve.admin_port`), with the same error shape."""
    app = FastAPI(title="asrops admin", docs_url=None, redoc_url=None)
    install_error_handlers(app, retry_after_s)
    app.include_router(router)
    return app


async def serve_admin(router: APIRouter, port: int, retry_after_s: int) -> None:
    """Serve the admin API on 127.0.0.1:`port` until cancelled (a task of the ingress replica)."""
    import uvicorn

    config = uvicorn.Config(build_admin_app(router, retry_after_s), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="off")
    await uvicorn.Server(config).serve()
