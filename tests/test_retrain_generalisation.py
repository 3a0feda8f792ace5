"""The gate stops a retrain that learnt sentences instead of acoustics (issue 17's failure: the
demo promoted a model worse on new sentences of the same drift). A candidate is really trained
here, the old way (the whole decoder, a high learning rate) and only on a few templates of the
drifted slice; the gate then judges it as a retrain would: held-out clips of other templates,
the same drift speaking sentences in no template, and real English speech. Real model, real
synthetic and recorded speech; no Ray (the stages of retrain/train.py run in-process)."""

from __future__ import annotations

import random

import pytest
import torch

from asrops.clip_manifest import read_rows, write_rows
from asrops.evaluation import core_english_filter, load_manifest
from asrops.models.importer import build_version_dir
from asrops.retrain import train
from asrops.retrain.evaluate import compare, gate, transcribe_manifest
from asrops.retrain.job import serving_engine
from asrops.settings import GateSettings, Settings, TrainSettings
from asrops.synth import PRESETS, generate, split_templates

pytestmark = pytest.mark.slow

DRIFT = PRESETS["drift-accent-noise"]


def test_a_candidate_trained_only_on_templates_is_stopped_by_the_gate(stable_dir, speech_dir, tmp_path):
    train_ids, heldout_ids = split_templates(0.5, seed=3)
    drift_train = [t for t in train_ids if t.startswith(("medical", "numbers"))][:4]
    drift_heldout = [t for t in heldout_ids if t.startswith(("medical", "numbers"))]
    rows = read_rows(generate(DRIFT.model_copy(update={"n": 48, "seed": 51, "template_ids": drift_train}),
                              tmp_path / "templates"), resolve_audio=True)
    heldout = generate(DRIFT.model_copy(update={"n": 16, "seed": 52, "template_ids": drift_heldout}),
                       tmp_path / "heldout")
    unseen = generate(DRIFT.model_copy(update={"n": 16, "seed": 53, "text": "unseen"}), tmp_path / "unseen")
    real = write_rows(tmp_path / "real.jsonl", ({"audio": i.audio, "text": i.text} for i in
                                                load_manifest(speech_dir / "manifest.jsonl",
                                                              filter=core_english_filter)[:16]))
    settings = TrainSettings(max_steps=24, batch_size=8, learning_rate=3e-4, warmup_steps=0, threads=2,
                             train_decoder="all", train_encoder_top_layers=0)
    job = train.TrainJob(parent_dir=stable_dir, train_manifest=write_rows(tmp_path / "train.jsonl", rows[:40]),
                         validation_manifest=write_rows(tmp_path / "validation.jsonl", rows[40:]),
                         storage_path=str(tmp_path / "ckpt"), name="templates", output_dir=tmp_path / "model",
                         settings=settings)
    run = train.setup(job, torch.device("cpu"))
    run.progress.best = float("inf")  # keep the last step, whatever validation says
    rng = random.Random(0)
    for _ in range(settings.max_steps):
        train.train_step(run, rng)
    train._save_best(run.model, run.processor, job.output_dir, settings)

    # Judged as a retrain judges (retrain/job.py): both versions on the engine that serves them.
    candidate_dir = build_version_dir(job.output_dir / train.BEST_DIR, tmp_path / "version")
    served = Settings()
    engines = {"stable": serving_engine(served, stable_dir), "candidate": serving_engine(served, candidate_dir)}
    gate_settings = GateSettings()

    def judged(name, manifest):
        results = {version: transcribe_manifest(engine, manifest, batch_size=served.engine.offline_batch_size)
                   for version, engine in engines.items()}
        return compare(results["candidate"], results["stable"], gate_settings, name)

    decision = gate(judged("held-out", heldout), [judged("real speech", real)], gate_settings,
                    generalisation=[judged("unseen sentences", unseen)])
    assert not decision.passed, decision.reasons
    # stopped for what it is: worse on new sentences of the drift, or on real speech
    assert any(("unseen sentences" in r and "above the required" in r) or ("real speech" in r and "beyond" in r)
               for r in decision.reasons), decision.reasons
