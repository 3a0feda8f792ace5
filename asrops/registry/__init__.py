"""Versioned model storage: immutable versions, aliases and rollout state with compare-and-swap."""

from asrops.registry.manifest import (
    ALIAS_NAMES,
    Aliases,
    FileEntry,
    Record,
    RolloutState,
    VersionManifest,
    new_version_id,
    referenced_versions,
    validate_version_id,
)
from asrops.registry.registry import ModelRegistry, hash_file, verify_dir
from asrops.registry.store import LocalStore, ObjectStore, S3Store, open_store

__all__ = [
    "ALIAS_NAMES",
    "Aliases",
    "FileEntry",
    "LocalStore",
    "ModelRegistry",
    "ObjectStore",
    "Record",
    "RolloutState",
    "S3Store",
    "VersionManifest",
    "hash_file",
    "new_version_id",
    "open_store",
    "referenced_versions",
    "validate_version_id",
    "verify_dir",
]
