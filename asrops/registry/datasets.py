"""Labelled datasets kept in the registry's store beside the models: the retrain gate's golden
and generalisation sets, replay, retention and self-label sets. On a cluster nothing lies beside
the code (no `../shared`), so the sets a retrain is judged on travel the way models do:
immutable, checksummed, fetched and verified on every use.

    datasets/<name>/<version>/files/manifest.jsonl     the clip manifest (audio paths relative)
    datasets/<name>/<version>/files/audio/...          the clips, as imported
    datasets/<name>/<version>/manifest.json            written last: the version exists iff it does

A version is the content's hash, so importing the same clips again is the same version. Settings
name a dataset wherever they take a manifest: `registry:<name>` (its newest version) or
`registry:<name>@<version>` (pinned).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, field_validator

from asrops.clip_manifest import read_rows, write_rows
from asrops.errors import ConflictError, RegistryError
from asrops.registry.manifest import VERSION_ID_RE, FileEntry
from asrops.registry.registry import fetch_tree, hash_file
from asrops.registry.store import ObjectStore, Progress, open_store, report_progress
from asrops.settings import Settings

log = logging.getLogger(__name__)

REF_PREFIX = "registry:"
"""A manifest setting that starts with this names a registry dataset instead of a file."""
MANIFEST_FILE = "manifest.jsonl"
VERSION_HASH_CHARS = 16


class DatasetManifest(BaseModel):
    """One immutable dataset version: what it holds and where it came from."""

    name: str
    version: str
    created_at: AwareDatetime
    source: str
    """The manifest it was imported from."""
    rows: int
    files: list[FileEntry]

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return validate_dataset_name(value)

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"


def validate_dataset_name(name: str) -> str:
    if not VERSION_ID_RE.match(name):
        raise ValueError(f"invalid dataset name {name!r}: use 1-64 of [a-z0-9._-], starting with a letter or digit")
    return name


def is_dataset_ref(ref: str | Path) -> bool:
    return str(ref).startswith(REF_PREFIX)


class DatasetStore:
    """Import, list and fetch datasets in an ObjectStore (the registry's)."""

    def __init__(self, store: ObjectStore, cache_dir: Path):
        self.store, self.cache_dir = store, Path(cache_dir) / "datasets"

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetStore:
        """The registry's own store: datasets live beside the models."""
        return cls(open_store(settings.registry_uri, settings.registry.s3_endpoint_url, settings.registry.s3_region),
                   settings.cache_dir)

    def resolve(self, ref: str | Path) -> Path:
        """A manifest setting as a local manifest: a path as it is, a `registry:` name fetched."""
        return self.fetch(str(ref)) if is_dataset_ref(ref) else Path(ref)

    def import_manifest(self, manifest: Path, name: str, keep: Callable[[dict], bool] | None = None,
                        progress: Progress | None = None) -> DatasetManifest:
        """Copy a clip manifest's rows (those `keep` accepts) and their audio into the store as
        a new version of `name`, or return the existing version with the same content."""
        validate_dataset_name(name)
        rows = [r for r in read_rows(manifest, resolve_audio=True) if keep is None or keep(r)]
        if not rows:
            raise RegistryError(f"{manifest}: no rows to import as dataset {name!r}")
        with tempfile.TemporaryDirectory(prefix=f"dataset-{name}-") as tmp:
            root = Path(tmp)
            (root / "audio").mkdir()
            for i, row in enumerate(rows):
                source = Path(row["audio"])
                if not source.is_file():
                    raise RegistryError(f"{manifest}: row {i + 1}: audio {source} does not exist")
                relative = f"audio/{i:06d}-{source.name}"
                (root / relative).write_bytes(source.read_bytes())
                row["audio"] = relative
                if (i + 1) % 100 == 0:
                    report_progress(progress, f"dataset {name}: copied {i + 1}/{len(rows)} clips")
            write_rows(root / MANIFEST_FILE, rows)
            entries = []
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                size, digest = hash_file(path)
                entries.append(FileEntry(path=path.relative_to(root).as_posix(), size=size, sha256=digest))
            content = hashlib.sha256("".join(f"{e.path} {e.sha256}\n" for e in entries).encode()).hexdigest()
            dataset = DatasetManifest(name=name, version=content[:VERSION_HASH_CHARS], created_at=datetime.now(UTC),
                                      source=str(manifest), rows=len(rows), files=entries)
            if self.store.exists(self._manifest_key(name, dataset.version)):
                report_progress(progress, f"dataset {dataset.id} already holds these {len(rows)} clips")
                return self.get(name, dataset.version)
            try:
                self.store.put_tree(self._prefix(name, dataset.version),
                                    {f"files/{e.path}": root / e.path for e in entries},
                                    "manifest.json", dataset.model_dump_json(indent=2).encode(), progress)
            except ConflictError:  # another import of the same content won
                return self.get(name, dataset.version)
        report_progress(progress, f"imported dataset {dataset.id}: {len(rows)} clips, "
                                  f"{sum(e.size for e in entries) / 1e6:.1f} MB")
        return dataset

    def list(self, name: str | None = None) -> list[DatasetManifest]:
        """Complete versions (those with a manifest), oldest first."""
        prefix = f"datasets/{name}/" if name else "datasets/"
        found = []
        for key in self.store.list_prefix(prefix):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == "manifest.json":
                found.append(self.get(parts[1], parts[2]))
        return sorted(found, key=lambda d: (d.created_at, d.name, d.version))

    def get(self, name: str, version: str | None = None) -> DatasetManifest:
        """A version of `name`; None: its newest."""
        if version is None:
            versions = self.list(validate_dataset_name(name))
            if not versions:
                known = sorted({d.name for d in self.list()})
                raise RegistryError(f"no dataset {name!r} in the registry (known: {', '.join(known) or 'none'}); "
                                    f"import one with `asrops data import MANIFEST --name {name}`")
            return versions[-1]
        if not VERSION_ID_RE.match(version):
            raise RegistryError(f"invalid version {version!r} of dataset {name!r}")
        try:
            data, _ = self.store.read_bytes(self._manifest_key(validate_dataset_name(name), version))
        except KeyError:
            raise RegistryError(f"no version {version!r} of dataset {name!r} in the registry") from None
        return DatasetManifest.model_validate_json(data)

    def fetch(self, ref: str) -> Path:
        """`registry:<name>[@<version>]` as a local clip manifest, every file verified."""
        name, _, version = ref.removeprefix(REF_PREFIX).partition("@")
        dataset = self.get(name, version or None)
        root = fetch_tree(self.store, f"{self._prefix(dataset.name, dataset.version)}/files", dataset,
                          self.cache_dir / dataset.name / dataset.version)
        log.info("dataset %s: %d clips in %s", dataset.id, dataset.rows, root)
        return root / MANIFEST_FILE

    @staticmethod
    def _prefix(name: str, version: str) -> str:
        return f"datasets/{name}/{version}"

    def _manifest_key(self, name: str, version: str) -> str:
        return f"{self._prefix(name, version)}/manifest.json"
