"""The model registry: immutable versions, aliases and rollout state over an ObjectStore.
It is the one source of truth the ingress polls and the CLI/retrain job/controller write."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from asrops.errors import (
    ChecksumMismatchError,
    ConflictError,
    RegistryError,
    VersionExistsError,
    VersionNotFoundError,
    shown,
)
from asrops.registry.manifest import (
    ALIAS_NAMES,
    VERSION_ID_RE,
    Aliases,
    FileEntry,
    Record,
    RolloutState,
    VersionManifest,
    validate_version_id,
)
from asrops.registry.store import ObjectStore, Progress, open_store, report_progress
from asrops.settings import Settings

logger = logging.getLogger(__name__)

ALIASES_KEY = "aliases.json"
ROLLOUT_KEY = "rollout.json"
M = TypeVar("M", bound=BaseModel)


def _version_prefix(version_id: str) -> str:
    return f"versions/{version_id}"


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file, streamed: model files are hundreds of MB."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
    return path.stat().st_size, digest.hexdigest()


def verify_dir(root: Path, manifest: VerifiedTree) -> None:
    """Raise ChecksumMismatchError unless `root` holds exactly the manifest's files, byte for byte."""
    expected = {f.path: f for f in manifest.files}
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    where = f"{manifest.id!r} ({root})"
    if missing := sorted(expected.keys() - present):
        raise ChecksumMismatchError(f"{where}: file {missing[0]!r} is missing")
    if unexpected := sorted(present - expected.keys()):
        raise ChecksumMismatchError(f"{where}: file {unexpected[0]!r} is not in the manifest")
    for entry in manifest.files:
        path = root / entry.path
        size = path.stat().st_size
        if size != entry.size:
            raise ChecksumMismatchError(
                f"{where}: file {entry.path!r} has {size} bytes, the manifest says {entry.size}")
        if (digest := hash_file(path)[1]) != entry.sha256:
            raise ChecksumMismatchError(
                f"{where}: file {entry.path!r} has sha256 {digest}, the manifest says {entry.sha256}")


class VerifiedTree(Protocol):
    """What a stored tree's manifest tells `verify_dir`: its name and its files."""

    id: str
    files: list[FileEntry]


def fetch_tree(store: ObjectStore, prefix: str, manifest: VerifiedTree, target: Path) -> Path:
    """The files under `prefix` as a local directory, verified against `manifest` on every call:
    in place for a local store, else downloaded into `target` (a partial copy renamed into place,
    so readers never see half a tree)."""
    in_place = store.local_path(prefix)
    if in_place is not None:
        verify_dir(in_place, manifest)
        return in_place
    if target.exists():
        verify_dir(target, manifest)
        return target
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex}")
    try:
        for entry in manifest.files:
            store.download_file(f"{prefix}/{entry.path}", partial / entry.path)
        verify_dir(partial, manifest)
        try:
            os.rename(partial, target)
            logger.info("fetched %s into %s", manifest.id, target)
            return target
        except OSError:
            if not target.exists():
                raise
    except KeyError as exc:
        raise ChecksumMismatchError(f"{manifest.id!r}: file {exc.args[0]!r} is missing from the store") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    verify_dir(target, manifest)  # a concurrent fetch renamed its copy first
    return target


class ModelRegistry:
    """Versions live at `versions/<id>/files/...` with `versions/<id>/manifest.json` written last:
    a version exists iff its manifest does. `aliases.json` and `rollout.json` change only by CAS."""

    def __init__(self, store: ObjectStore, cache_dir: Path):
        self.store = store
        self.cache_dir = Path(cache_dir)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        store = open_store(settings.registry_uri, settings.registry.s3_endpoint_url, settings.registry.s3_region)
        return cls(store, settings.cache_dir)

    # --- versions ----------------------------------------------------------------------
    def publish(
        self,
        source_dir: Path,
        *,
        id: str,
        family: str,
        parent: str | None,
        source: str,
        eval_metrics: dict[str, float] | None = None,
        notes: str = "",
        data_fingerprint: str | None = None,
        extra: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> VersionManifest:
        """Hash and store every file under `source_dir` as a new immutable version. Of two
        publishers of one id exactly one wins; the other gets VersionExistsError."""
        try:
            validate_version_id(id)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
        if self._exists(id):
            raise VersionExistsError(f"version {id!r} is already published; versions are immutable")
        if parent is not None and not self._exists(parent):
            raise VersionNotFoundError(f"parent version {parent!r} of {id!r} does not exist")
        source_dir = Path(source_dir)
        paths = sorted(p for p in source_dir.rglob("*") if p.is_file())
        if not paths:
            raise RegistryError(f"{source_dir} holds no files to publish")
        entries = []
        for path in paths:
            size, digest = hash_file(path)
            rel = path.relative_to(source_dir).as_posix()
            entries.append(FileEntry(path=rel, size=size, sha256=digest))
            report_progress(progress, f"hashed {rel} ({size / 1e6:.1f} MB, sha256 {digest[:12]})")
        manifest = VersionManifest(
            id=id, family=family, parent=parent, created_at=datetime.now(UTC), source=source,
            files=entries, eval_metrics=eval_metrics or {}, data_fingerprint=data_fingerprint,
            notes=notes, extra=extra or {},
        )
        try:
            self.store.put_tree(
                _version_prefix(id),
                {f"files/{e.path}": source_dir / e.path for e in entries},
                "manifest.json",
                manifest.model_dump_json(indent=2).encode(),
                progress,
            )
        except ConflictError:
            raise VersionExistsError(
                f"version {id!r} is taken: published or being published by another writer, or an "
                "earlier attempt was interrupted; publish under a new id") from None
        total_mb = sum(e.size for e in entries) / 1e6
        report_progress(progress, f"published {id} ({len(entries)} files, {total_mb:.1f} MB)")
        return manifest

    def list_versions(self) -> list[VersionManifest]:
        """Complete versions only (those with a manifest), oldest first."""
        ids = [parts[1] for key in self.store.list_prefix("versions/")
               if len(parts := key.split("/")) == 3 and parts[2] == "manifest.json"]
        return sorted((self._read_manifest(i) for i in ids), key=lambda m: (m.created_at, m.id))

    def resolve(self, name: str) -> str:
        """An alias (`stable`, `canary`, `fallback`) or an existing id -> the version id."""
        if name in ALIAS_NAMES:
            return self._alias_target(name)
        if self._exists(name):
            return name
        raise self._not_found(name)

    def get_manifest(self, name: str) -> VersionManifest:
        return self._read_manifest(self._alias_target(name) if name in ALIAS_NAMES else name)

    def fetch(self, name: str) -> Path:
        """A local directory with the version's files, every file's sha256 verified on every call
        (local store: in place; S3: through `cache_dir/<id>`, which is re-verified too)."""
        manifest = self.get_manifest(name)
        return fetch_tree(self.store, f"{_version_prefix(manifest.id)}/files", manifest, self.cache_dir / manifest.id)

    def _exists(self, version_id: str) -> bool:
        return bool(VERSION_ID_RE.match(version_id)) and self.store.exists(
            f"{_version_prefix(version_id)}/manifest.json")

    def _read_manifest(self, version_id: str) -> VersionManifest:
        if not VERSION_ID_RE.match(version_id):
            raise self._not_found(version_id)
        try:
            data, _ = self.store.read_bytes(f"{_version_prefix(version_id)}/manifest.json")
        except KeyError:
            raise self._not_found(version_id) from None
        manifest = VersionManifest.model_validate_json(data)
        if manifest.id != version_id:
            raise RegistryError(f"manifest of version {version_id!r} claims id {manifest.id!r}")
        return manifest

    def _alias_target(self, alias: str) -> str:
        if (target := getattr(self.read_aliases().value, alias)) is None:
            raise self._not_found(alias)
        return target

    def _not_found(self, name: str) -> VersionNotFoundError:
        aliases = self.read_aliases().value
        known = ", ".join(f"{a}={getattr(aliases, a) or '(unset)'}" for a in ALIAS_NAMES)
        return VersionNotFoundError(f"no version or alias {shown(name)} in the registry; aliases: {known}")

    # --- aliases and rollout (compare-and-swap) ------------------------------------------
    def read_aliases(self) -> Record[Aliases]:
        return self._read_record(ALIASES_KEY, Aliases)

    def write_aliases(self, new: Aliases, expected_token: str | None) -> str:
        """Replace the aliases if unchanged since `expected_token` was read (else ConflictError)."""
        return self._put_aliases(new, expected_token)[1]

    def update_aliases(self, fn: Callable[[Aliases], Aliases], retries: int = 0) -> Record[Aliases]:
        """Read, apply `fn`, write with CAS; on a lost race re-read and retry up to `retries` times."""
        return self._update(self.read_aliases, self._put_aliases, fn, retries)

    def read_rollout(self) -> Record[RolloutState]:
        return self._read_record(ROLLOUT_KEY, RolloutState)

    def write_rollout(self, new: RolloutState, expected_token: str | None) -> str:
        """Like write_aliases; `updated_at` is stamped with the write time."""
        return self._put_rollout(new, expected_token)[1]

    def update_rollout(
        self, fn: Callable[[RolloutState], RolloutState], retries: int = 0
    ) -> Record[RolloutState]:
        return self._update(self.read_rollout, self._put_rollout, fn, retries)

    def read_record(self, key: str, model: type[M]) -> Record[M]:
        """Any other small record kept beside the aliases (the promotion controller's state);
        `model()` when absent."""
        return self._read_record(key, model)

    def update_record(self, key: str, model: type[M], fn: Callable[[M], M], retries: int = 0) -> Record[M]:
        """Read-modify-write of such a record with compare-and-swap, like update_aliases."""
        def put(new: M, token: str | None) -> tuple[M, str]:
            return new, self.store.write_if(key, new.model_dump_json(indent=2).encode(), token)

        return self._update(lambda: self._read_record(key, model), put, fn, retries)

    def _put_aliases(self, new: Aliases, token: str | None) -> tuple[Aliases, str]:
        for alias in ALIAS_NAMES:
            if (target := getattr(new, alias)) is not None and not self._exists(target):
                raise VersionNotFoundError(f"alias {alias!r} cannot point at {target!r}: no such version")
        new_token = self.store.write_if(ALIASES_KEY, new.model_dump_json(indent=2).encode(), token)
        logger.info("aliases now %s", new.model_dump())
        return new, new_token

    def _put_rollout(self, new: RolloutState, token: str | None) -> tuple[RolloutState, str]:
        if new.canary_version is not None and not self._exists(new.canary_version):
            raise VersionNotFoundError(f"rollout canary {new.canary_version!r}: no such version")
        new = new.model_copy(update={"updated_at": datetime.now(UTC)})
        new_token = self.store.write_if(ROLLOUT_KEY, new.model_dump_json(indent=2).encode(), token)
        logger.info("rollout now %s", new.model_dump(mode="json"))
        return new, new_token

    def _read_record(self, key: str, model: type[M]) -> Record[M]:
        try:
            data, token = self.store.read_bytes(key)
        except KeyError:
            return Record(model(), None)
        return Record(model.model_validate_json(data), token)

    @staticmethod
    def _update(read: Callable[[], Record[M]], put: Callable[[M, str | None], tuple[M, str]],
                fn: Callable[[M], M], retries: int) -> Record[M]:
        for attempt in range(retries + 1):
            current = read()
            try:
                return Record(*put(fn(current.value), current.token))
            except ConflictError:
                if attempt == retries:
                    raise
                time.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))  # de-synchronise writers
        raise AssertionError("unreachable")
