"""The exception hierarchy. Each error carries a message a person can act on; the HTTP layer
maps these classes (and only these) to status codes in one place."""

from __future__ import annotations

SHOWN_CHARS = 64
"""How much of a value a client sent an error message quotes: a 100-KB model name is not echoed."""


def shown(value: str) -> str:
    """`value` quoted for an error message, cut to SHOWN_CHARS."""
    return repr(value) if len(value) <= SHOWN_CHARS else f"{value[:SHOWN_CHARS]!r}..."


class AsropsError(Exception):
    """Base of every error asrops raises on purpose."""


# --- audio input -------------------------------------------------------------------------
class AudioError(AsropsError):
    """The input audio cannot be used; the client must send something else."""


class EmptyAudioError(AudioError):
    """Zero bytes, or a container with no samples."""


class UndecodableAudioError(AudioError):
    """Not audio, truncated, or a codec we cannot read."""


class InvalidAudioError(AudioError):
    """Decodes, but the signal itself is unusable (NaN/inf samples, absurd sample rate or channel count)."""


class AudioTooLongError(AudioError):
    """Longer than the configured maximum duration."""


class AudioTooLargeError(AudioError):
    """Upload larger than the configured maximum size."""


# --- model registry ----------------------------------------------------------------------
class RegistryError(AsropsError):
    """A registry operation failed."""


class VersionNotFoundError(RegistryError):
    """No such version id or alias."""


class VersionExistsError(RegistryError):
    """A version with this id is already published (versions are immutable)."""


class ConflictError(RegistryError):
    """A compare-and-swap write lost: someone else changed the record since it was read."""


class ChecksumMismatchError(RegistryError):
    """A file of a version does not match the sha256 in its manifest (tampered or corrupt)."""


class StoreUnavailableError(AsropsError, OSError):
    """The object store (S3 or a directory) could not be reached or failed the call: retry later.
    Also an OSError, so what treats a broken directory as a passing fault treats S3 alike."""


class ModelImportError(AsropsError):
    """A model could not be imported (missing files, unknown layout)."""


class RolloutRefusedError(RegistryError):
    """A rollout change that makes no sense in the current state (e.g. promote with no canary)."""
