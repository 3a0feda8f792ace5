"""The labelled-clip manifest: the one file format every dataset in asrops is exchanged in.

JSON Lines, one object per clip: `audio` (a path, relative to the manifest's folder or absolute)
and `text` (its transcript), plus any other fields (slices such as `voice` or `snr_db`, a
`template`, a `source`). `asrops synth` writes them, `asrops eval` and the retrain read them.
Written whole or not at all (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def numbered_rows(manifest: Path, *, resolve_audio: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each row with its line number (for messages that point at it); with `resolve_audio`,
    `audio` becomes an absolute path."""
    manifest = Path(manifest)
    for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{manifest}:{line_no}: not a JSON object: {exc}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{manifest}:{line_no}: not a JSON object")
        if resolve_audio and "audio" in row:
            row["audio"] = audio_path(manifest, row["audio"])
        yield line_no, row


def read_rows(manifest: Path, *, resolve_audio: bool = False) -> list[dict[str, Any]]:
    """Every row as a dict; with `resolve_audio`, `audio` becomes an absolute path."""
    return [row for _, row in numbered_rows(manifest, resolve_audio=resolve_audio)]


def audio_path(manifest: Path, audio: str) -> str:
    """A row's `audio` as an absolute path (relative ones are relative to the manifest's folder)."""
    return str((Path(manifest).parent / audio).resolve())


def write_rows(manifest: Path, rows: Iterable[dict[str, Any] | str]) -> Path:
    """Write rows (dicts, or JSON text already serialised) atomically; returns the path."""
    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, manifest)
    return manifest
