"""Registry datasets (asrops/registry/datasets.py): the sets a retrain is judged on, kept beside
the models in the local store and in S3 (a real moto server over HTTP), as `asrops data` and
the retrain job use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from asrops.clip_manifest import read_rows, write_rows
from asrops.errors import ChecksumMismatchError, RegistryError
from asrops.registry.datasets import DatasetStore
from asrops.settings import Settings


@pytest.fixture
def settings(registry_settings) -> Settings:
    return registry_settings


def _manifest(root: Path, n: int = 3) -> Path:
    """n short clips of distinct tones, relative paths, with a slice field."""
    (root / "audio").mkdir(parents=True)
    rows = []
    for i in range(n):
        t = np.arange(8000) / 16000
        sf.write(root / "audio" / f"clip{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t), 16000)
        rows.append({"audio": f"audio/clip{i}.wav", "text": f"sentence number {i}", "lang": "en",
                     "tier": "gold" if i else "silver", "duration_s": 1.5})
    return write_rows(root / "manifest.jsonl", rows)


def test_a_manifest_imported_once_is_fetched_by_name_verified_and_immutable(settings, tmp_path):
    datasets = DatasetStore.from_settings(settings)
    source = _manifest(tmp_path / "src")
    dataset = datasets.import_manifest(source, "golden")
    assert dataset.rows == 3 and {f.path for f in dataset.files} >= {"manifest.jsonl", "audio/000000-clip0.wav"}
    assert datasets.import_manifest(source, "golden").version == dataset.version  # same clips, same version
    local = datasets.resolve("registry:golden")
    rows = read_rows(local, resolve_audio=True)
    assert [r["text"] for r in rows] == ["sentence number 0", "sentence number 1", "sentence number 2"]
    assert all(Path(r["audio"]).is_file() and str(r["audio"]).startswith(str(local.parent)) for r in rows)
    assert datasets.resolve(f"registry:golden@{dataset.version}") == local
    assert datasets.resolve(source) == source  # a plain path stays a path
    # Other clips are a new version, and the name means the newest one.
    (tmp_path / "src" / "audio" / "clip1.wav").write_bytes((tmp_path / "src" / "audio" / "clip0.wav").read_bytes())
    newer = datasets.import_manifest(source, "golden")
    assert newer.version != dataset.version and datasets.get("golden").version == newer.version
    assert [d.version for d in datasets.list("golden")] == [dataset.version, newer.version]


def test_a_tampered_or_unknown_dataset_is_refused_loudly(settings, tmp_path):
    datasets = DatasetStore.from_settings(settings)
    dataset = datasets.import_manifest(_manifest(tmp_path / "src"), "golden")
    local = datasets.resolve("registry:golden")
    (local.parent / "audio" / "000001-clip1.wav").write_bytes(b"RIFF, but not the clip")
    with pytest.raises(ChecksumMismatchError, match=r"golden@.*000001-clip1\.wav"):
        datasets.resolve("registry:golden")
    with pytest.raises(RegistryError, match="no dataset 'silver'.*known: golden.*asrops data import"):
        datasets.resolve("registry:silver")
    with pytest.raises(RegistryError, match="no version"):
        datasets.resolve("registry:golden@0123456789abcdef")
    with pytest.raises((RegistryError, ValueError)):
        datasets.resolve("registry:golden@../../aliases.json")
    assert dataset.rows == 3


def test_the_retrain_judges_a_registry_golden_set_as_a_part_named_after_it(settings, tmp_path):
    from asrops.retrain.job import prepare_golden

    DatasetStore.from_settings(settings).import_manifest(_manifest(tmp_path / "src"), "golden")
    settings.retrain.golden_manifests = ["registry:golden"]
    (part,) = prepare_golden(settings, tmp_path / "work")
    assert part.name == "golden" and len(read_rows(part.manifest)) == 3


def test_asrops_data_import_and_list(settings, tmp_path):
    """The CLI reads the same ASROPS_* environment the fixture set up."""
    from asrops.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "import", str(_manifest(tmp_path / "src")), "--name", "real",
                                 "--core-english"])
    assert result.exit_code == 0, result.output
    ref = result.output.strip().splitlines()[-1]
    assert ref.startswith("registry:real@")
    assert len(read_rows(DatasetStore.from_settings(Settings()).resolve(ref))) == 2  # the silver row left out
    listed = runner.invoke(app, ["data", "list"])
    assert listed.exit_code == 0 and ref.removeprefix("registry:") in listed.output
