"""The slice gate (asrops/engines/slice_gate.py, retrain/slice_gate.py): fitted on a retrain's
own training split, it sends windows of the drift to the retrained encoder and everything else
to the parent's, token for token the parent's answer. Real recorded speech, real synthetic
drift (espeak-ng voices in noise), the real model and ONNX Runtime; the "retrained" encoder
here is the parent's fp32 encoder standing in the int8 slot, so the two paths give visibly
different encoder outputs without a training run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from asrops.audio import decode_audio
from asrops.clip_manifest import read_rows, write_rows
from asrops.engines import ENCODERS, load_engine
from asrops.engines.decoding import N_SAMPLES
from asrops.engines.log_mel import LogMel
from asrops.engines.onnx_backend import onnx_encoder
from asrops.engines.slice_gate import GATE_DIR, GatedBackend, SliceGate, window_features
from asrops.evaluation import core_english_clips
from asrops.retrain.slice_gate import attach_slice_gate, fit_slice_gate, routed_manifest
from asrops.settings import SliceGateSettings
from asrops.synth import PRESETS, generate, speaking

DRIFT = PRESETS["drift-accent-noise"]


def _rows(manifest: Path, source: str) -> list[dict]:
    return [{**row, "source": source} for row in read_rows(manifest, resolve_audio=True)]


@pytest.fixture(scope="module")
def sets(speech_dir, tmp_path_factory) -> dict[str, list[dict]]:
    """A retrain's training split (the drift's corrections and acoustics, replayed clean and
    self-labelled real speech), and audio it never saw: the drift in other voices and over
    unseen sentences, other real speech, clean speech of other templates."""
    tmp = tmp_path_factory.mktemp("slice-gate")
    drift = _rows(generate(DRIFT.model_copy(update={"n": 40, "seed": 61}), tmp / "drift"), "curated")
    clean = _rows(generate(PRESETS["clean"].model_copy(update={"n": 25, "seed": 62}), tmp / "clean"), "replay")
    speech = speech_dir / "manifest.jsonl"
    real = _rows(core_english_clips(speech, 100, 25, tmp / "real.jsonl"), "self_labelled")
    unseen_voices = speaking(DRIFT, "unseen", 16, 63).model_copy(update={"voices": ["en-us", "en-gb-x-rp", "awb"]})
    return {
        "train": [*drift, *clean, *real],
        "drift elsewhere": read_rows(generate(unseen_voices, tmp / "unseen"), resolve_audio=True),
        "real elsewhere": read_rows(core_english_clips(speech, 0, 40, tmp / "real-other.jsonl")),
        "clean elsewhere": read_rows(generate(PRESETS["clean"].model_copy(update={"n": 12, "seed": 64}),
                                              tmp / "clean-other"), resolve_audio=True),
    }


@pytest.fixture(scope="module")
def gate(sets, stable_dir, tmp_path_factory) -> SliceGate:
    tmp = tmp_path_factory.mktemp("slice-gate-fit")
    fitted = fit_slice_gate(write_rows(tmp / "train.jsonl", sets["train"]),
                            write_rows(tmp / "validation.jsonl", []), stable_dir, "stable", SliceGateSettings())
    assert fitted is not None
    return fitted


def _features(rows: list[dict], stable_dir: Path) -> np.ndarray:
    log_mel = LogMel(stable_dir)
    return window_features(log_mel([decode_audio(Path(r["audio"]).read_bytes()).samples[:N_SAMPLES] for r in rows]))


def test_the_gate_sends_the_drift_in_unseen_voices_to_the_retrained_layers_and_real_speech_to_the_parent(
        gate, sets, stable_dir):
    assert gate.validation["drift_to_retrained"] == 1.0 and gate.validation["known_good_to_parent"] == 1.0
    assert gate.to_retrained(_features(sets["drift elsewhere"], stable_dir)).mean() >= 0.9
    assert not gate.to_retrained(_features(sets["real elsewhere"], stable_dir)).any()
    assert not gate.to_retrained(_features(sets["clean elsewhere"], stable_dir)).any()


def test_no_gate_when_the_two_kinds_of_training_clip_sound_alike(sets, stable_dir, tmp_path):
    clean = [r for r in sets["train"] if r["source"] == "replay"]
    real = [r for r in sets["train"] if r["source"] == "self_labelled"]
    # half of each kind labelled as the drift: nothing in the audio tells the labels apart
    rows = [{**r, "source": "curated" if i % 2 else r["source"]} for i, r in enumerate([*clean, *real])]
    assert fit_slice_gate(write_rows(tmp_path / "train.jsonl", rows), write_rows(tmp_path / "v.jsonl", []),
                          stable_dir, "stable", SliceGateSettings()) is None
    assert fit_slice_gate(write_rows(tmp_path / "train.jsonl", sets["train"]), write_rows(tmp_path / "v.jsonl", []),
                          stable_dir, "stable", SliceGateSettings(enabled=False)) is None


def test_only_retention_clips_the_gate_sends_to_the_retrained_layers_are_guarded(gate, sets, stable_dir, tmp_path):
    rows = [*sets["real elsewhere"][:6], *sets["drift elsewhere"][:4]]
    kept = routed_manifest(write_rows(tmp_path / "retention.jsonl", rows), gate, stable_dir, tmp_path / "routed.jsonl")
    assert kept is not None
    assert {r["audio"] for r in read_rows(kept)} == {r["audio"] for r in sets["drift elsewhere"][:4]}
    real_only = write_rows(tmp_path / "real.jsonl", rows[:6])
    assert routed_manifest(real_only, gate, stable_dir, tmp_path / "r2.jsonl") is None


def _gated_copy(stable_dir: Path, parent_dir: Path, gate: SliceGate, out: Path) -> Path:
    """`stable_dir` as a gated version over `parent_dir`, its int8 slot holding the fp32 encoder."""
    shutil.copytree(stable_dir, out, ignore=shutil.ignore_patterns(GATE_DIR))
    assert attach_slice_gate(out, parent_dir, gate)
    shutil.copy2(stable_dir / ENCODERS["onnx"], out / ENCODERS["onnx-int8"])
    return out


def test_a_gated_version_encodes_each_window_with_its_own_path_and_answers_real_speech_as_the_parent(
        gate, sets, stable_dir, engines, tmp_path):
    candidate = _gated_copy(stable_dir, stable_dir, gate, tmp_path / "candidate")
    engine = load_engine(candidate, "onnx-int8", "cpu", 2)
    assert isinstance(engine.backend, GatedBackend)
    mixed = [sets["real elsewhere"][0], sets["drift elsewhere"][0], sets["real elsewhere"][1],
             sets["drift elsewhere"][1]]
    audios = [decode_audio(Path(r["audio"]).read_bytes()).samples for r in mixed]
    mel = engine.log_mel([a[:N_SAMPLES] for a in audios])
    tuned, parent = onnx_encoder(stable_dir / ENCODERS["onnx"]), onnx_encoder(stable_dir / ENCODERS["onnx-int8"])
    routed: list[tuple[int, int]] = []
    engine.backend.on_route = lambda retrained, parent: routed.append((retrained, parent))  # the replica's metric
    encoded = engine.backend.encode(mel)
    assert routed == [(2, 2)]
    drift = np.array([False, True, False, True])
    assert np.abs(tuned(mel[drift]) - parent(mel[drift])).max() > 1e-2  # the two paths really differ
    np.testing.assert_allclose(encoded[drift], tuned(mel[drift]), atol=1e-4)
    np.testing.assert_allclose(encoded[~drift], parent(mel[~drift]), atol=1e-4)
    # end to end, in one batch: the real clips get the parent's (onnx-int8) answers exactly
    answers = engine.transcribe(audios)
    expected = engines["onnx-int8"].transcribe([audios[0], audios[2]])
    assert [answers[0].text, answers[2].text] == [t.text for t in expected]

    # the next retrain's candidate nests its parent's gate: here a gate that turns the drift away
    # sends it down to the first candidate, whose gate sends it to its retrained encoder
    inverted = gate.model_copy(update={"weights": [-w for w in gate.weights], "bias": -gate.bias})
    grandchild = _gated_copy(stable_dir, candidate, inverted, tmp_path / "grandchild")
    assert (grandchild / GATE_DIR / "parent" / GATE_DIR / "gate.json").exists()
    shutil.copy2(stable_dir / ENCODERS["onnx-int8"], grandchild / ENCODERS["onnx-int8"])
    nested = load_engine(grandchild, "onnx-int8", "cpu", 2).backend.encode(mel)
    np.testing.assert_allclose(nested[drift], tuned(mel[drift]), atol=1e-4)
    np.testing.assert_allclose(nested[~drift], parent(mel[~drift]), atol=1e-4)


def test_the_torch_engine_routes_like_the_onnx_engines(gate, sets, stable_dir, engines, tmp_path):
    import torch

    candidate = _gated_copy(stable_dir, stable_dir, gate, tmp_path / "candidate")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(candidate / "model.safetensors"))
    name = "model.encoder.layers.3.fc2.weight"
    weights[name] = weights[name] + 0.05 * torch.randn_like(weights[name], generator=torch.Generator().manual_seed(0))
    save_file(weights, str(candidate / "model.safetensors"), metadata={"format": "pt"})
    gated = load_engine(candidate, "torch", "cpu", 2)
    rows = [sets["drift elsewhere"][2], sets["real elsewhere"][2]]
    mel = gated.log_mel([decode_audio(Path(r["audio"]).read_bytes()).samples[:N_SAMPLES] for r in rows])
    encoded = gated.backend.encode(mel)
    tuned = gated.backend.tuned.encode(mel[:1])
    parent = engines["torch"].backend.encode(mel[1:])
    assert (tuned - engines["torch"].backend.encode(mel[:1])).abs().max() > 1e-2
    torch.testing.assert_close(encoded[:1], tuned, atol=1e-4, rtol=0)
    torch.testing.assert_close(encoded[1:], parent, atol=1e-4, rtol=0)


def test_a_candidate_whose_decoder_learnt_gets_no_gate(gate, stable_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    candidate = shutil.copytree(stable_dir, tmp_path / "candidate")
    weights = load_file(str(candidate / "model.safetensors"))
    weights["model.decoder.layer_norm.bias"] = weights["model.decoder.layer_norm.bias"] + 0.01
    save_file(weights, str(candidate / "model.safetensors"), metadata={"format": "pt"})
    assert not attach_slice_gate(candidate, stable_dir, gate)
    assert not (candidate / GATE_DIR).exists()
    assert not isinstance(load_engine(candidate, "onnx-int8", "cpu", 1).backend, GatedBackend)
