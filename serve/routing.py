"""Which version answers a request, and who else sees it: plain functions over the registry's
aliases and rollout state, so the rules are tested without Ray.

Canary assignment is sticky: a client's bucket (0-99.99) comes from a hash of its identity
and the canary's version id, and the client goes to the canary when its bucket is below the
weight. Raising the weight only moves clients from stable to canary, never back, and a new
canary reshuffles who goes first.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from pydantic import BaseModel

from asrops.errors import VersionNotFoundError, shown
from asrops.registry import ALIAS_NAMES, Aliases, RolloutState


class Route(StrEnum):
    STABLE = "stable"
    CANARY = "canary"
    EXPLICIT = "explicit"
    FALLBACK = "fallback"
    SHADOW = "shadow"


class RoutePlan(BaseModel):
    version: str
    """The version asked first."""
    route: Route
    fallbacks: list[tuple[str, Route]] = []
    """Who answers, in order, when `version` fails or its breaker is open."""
    shadow: str | None = None
    """A version that also gets a copy of the request; its answer is only compared."""


def bucket(client: str, salt: str) -> float:
    """The client's stable position in [0, 100) for this salt (the canary version)."""
    digest = hashlib.sha256(f"{salt}\0{client}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def plan_route(model: str, aliases: Aliases, rollout: RolloutState, client: str, request_id: str,
               running: set[str]) -> RoutePlan:
    """`model` is what the request named (`stable`, `canary`, an alias or a version id;
    `whisper-1` is mapped to `stable` before this); `client` is the sticky identity (the API
    key's hash or a client header; the request id when there is neither); the shadow share is
    drawn per request. `running` are the versions with a model application up.
    Raises VersionNotFoundError for a name nobody serves."""
    stable_chain = [(v, Route.FALLBACK) for v in [aliases.fallback] if v and v in running and v != aliases.stable]
    if model in ALIAS_NAMES and model != "stable":
        version = getattr(aliases, model)
        if version is None or version not in running:
            raise VersionNotFoundError(f"No version is {model} right now.")
        return RoutePlan(version=version, route=Route.EXPLICIT)
    if model not in ALIAS_NAMES:
        if model not in running:
            raise VersionNotFoundError(f"Model {shown(model)} is not served here.")
        return RoutePlan(version=model, route=Route.EXPLICIT)
    stable = aliases.stable
    if stable is None or stable not in running:
        if stable_chain:
            return RoutePlan(version=stable_chain[0][0], route=Route.FALLBACK)
        raise VersionNotFoundError("No stable version is being served right now.")
    canary = rollout.canary_version
    if canary and canary in running and canary != stable:
        if rollout.canary_weight and bucket(client, canary) < rollout.canary_weight:
            return RoutePlan(version=canary, route=Route.CANARY, fallbacks=[(stable, Route.FALLBACK), *stable_chain])
        if rollout.shadow_share and bucket(request_id, "shadow\0" + canary) < rollout.shadow_share * 100:
            return RoutePlan(version=stable, route=Route.SHADOW, fallbacks=stable_chain, shadow=canary)
    return RoutePlan(version=stable, route=Route.STABLE, fallbacks=stable_chain)
