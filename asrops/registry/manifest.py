"""The registry's records. Pydantic models because every one of them crosses a boundary
(JSON in the store, read by the ingress, the CLI and the controller)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Generic, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

VERSION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
"""Ids become Ray Serve deployment names and path components: keep them boring."""
ALIAS_NAMES = ("stable", "canary", "fallback")


def validate_version_id(version_id: str) -> str:
    """Return the id unchanged, or raise ValueError saying what a valid id looks like."""
    if not VERSION_ID_RE.match(version_id) or version_id in ALIAS_NAMES:
        raise ValueError(
            f"invalid version id {version_id!r}: use 1-64 of [a-z0-9._-], starting with a "
            f"letter or digit, and not an alias name ({', '.join(ALIAS_NAMES)})"
        )
    return version_id


def new_version_id(family: str) -> str:
    """A fresh, sortable, collision-resistant id: `<family-slug>-<UTC YYYYMMDDHHMMSS>-<6 hex>`."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", family.lower()).strip("-._")[:42] or "model"
    return f"{slug}-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(3)}"


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    """Posix path relative to the version's root; never absolute, never `..`."""
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _relative_posix(cls, value: str) -> str:
        p = PurePosixPath(value)
        if not value or "\\" in value or p.is_absolute() or ".." in p.parts or str(p) != value:
            raise ValueError(f"file path must be a normalised relative posix path: {value!r}")
        return value


class VersionManifest(BaseModel):
    """Everything needed to trust and trace a version; written last, so it marks completeness."""

    id: str
    family: str
    parent: str | None = None
    created_at: AwareDatetime
    source: str
    files: list[FileEntry]
    eval_metrics: dict[str, float] = {}
    data_fingerprint: str | None = None
    notes: str = ""
    extra: dict[str, Any] = {}

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return validate_version_id(value)

    @field_validator("created_at")
    @classmethod
    def _created_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class Aliases(BaseModel):
    stable: str | None = None
    canary: str | None = None
    fallback: str | None = None


class RolloutState(BaseModel):
    canary_version: str | None = None
    canary_weight: int = Field(default=0, ge=0, le=100)
    """Percent of traffic routed to the canary."""
    shadow_share: float = Field(default=0.0, ge=0.0, le=1.0)
    """Fraction of requests mirrored to the canary without affecting the response."""
    updated_at: AwareDatetime | None = None
    updated_by: str = ""

    @field_validator("updated_at")
    @classmethod
    def _updated_utc(cls, value: datetime | None) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None


def referenced_versions(aliases: Aliases, rollout: RolloutState) -> set[str]:
    """The versions that must be running: every alias's and the rollout's canary."""
    return {v for v in (aliases.stable, aliases.canary, aliases.fallback, rollout.canary_version) if v}


T = TypeVar("T")


@dataclass(frozen=True)
class Record(Generic[T]):
    """A value read for compare-and-swap: pass `token` back when writing (None = did not exist)."""

    value: T
    token: str | None
