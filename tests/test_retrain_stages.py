"""The training loop's stages (retrain/train.py) run without Ray: set up, start from the parent,
step, evaluate, checkpoint, and resume from that checkpoint where the run left off. Real model
(the embedded tiny.en), real synthetic speech; two steps, so this checks the plumbing, not
learning (tests/test_retrain_job.py runs the same stages under Ray Train)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from asrops.clip_manifest import read_rows, write_rows
from asrops.engines.decoding import SpecialTokens
from asrops.retrain import train
from asrops.settings import TrainSettings
from asrops.synth import PRESETS, generate

pytestmark = pytest.mark.slow

PROBE = "model.decoder.layers.0.fc1.weight"


@pytest.fixture(scope="module")
def job(stable_dir, tmp_path_factory) -> train.TrainJob:
    out = tmp_path_factory.mktemp("stages")
    rows = read_rows(generate(PRESETS["clean"].model_copy(update={"n": 6, "seed": 41}), out / "clips"),
                     resolve_audio=True)
    settings = TrainSettings(max_steps=2, batch_size=2, eval_every_steps=1, threads=2, warmup_steps=0)
    return train.TrainJob(parent_dir=stable_dir, train_manifest=write_rows(out / "train.jsonl", rows[:4]),
                          validation_manifest=write_rows(out / "validation.jsonl", rows[4:]),
                          storage_path=str(out / "ckpt"), name="stages", output_dir=out / "model", settings=settings)


def test_special_tokens_come_from_the_tokenizer_and_agree_with_the_model_config(stable_dir):
    import json

    special = SpecialTokens.from_tokenizer_file(stable_dir / "tokenizer.json")
    gen = json.loads((stable_dir / "generation_config.json").read_text())
    assert special.sot == gen["decoder_start_token_id"] and special.eot == gen["eos_token_id"]
    assert special.no_timestamps == gen["no_timestamps_token_id"] and special.sot_prev == gen["prev_sot_token_id"]
    assert special.timestamp_begin == special.no_timestamps + 1


def test_the_stages_train_checkpoint_and_resume_where_they_left_off(job, tmp_path):
    run = train.setup(job, torch.device("cpu"))
    assert run.cached is not None and run.cached.shape[0] == 4  # the frozen encoder ran once per clip
    assert run.encoder.int8 is not None  # ...as served: the parent's int8 ONNX encoder

    labels = train._labels(run.processor.tokenizer, run.special, ["hello there"], [1.0])[0].tolist()
    assert labels[:2] == [run.special.sot, run.special.timestamp_begin]  # <|startoftranscript|><|0.00|>
    assert labels[-2:] == [run.special.timestamp_begin + 50, run.special.eot]  # <|1.00|><|endoftext|>

    train.resume(run, None)
    parent_wer = run.progress.best
    assert parent_wer is not None and (job.output_dir / train.BEST_DIR / "model.safetensors").exists()

    before = run.model.state_dict()[PROBE].clone()
    metrics = train.train_step(run, random.Random(0))
    assert metrics["step"] == 1 and math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert not torch.equal(before, run.model.state_dict()[PROBE])  # the decoder learnt something
    assert train.due_for_evaluation(run)
    wer = train.evaluate(run)
    assert wer >= 0 and run.progress.best == min(parent_wer, wer)
    train.checkpoint(run, tmp_path)

    again = train.setup(job, torch.device("cpu"))
    train.resume(again, tmp_path)
    assert (again.progress.step, again.progress.resumed_from, again.progress.best) == (1, 1, run.progress.best)
    assert torch.equal(again.model.state_dict()[PROBE], run.model.state_dict()[PROBE])
    assert again.scheduler.state_dict() == run.scheduler.state_dict()
    assert train.train_step(again, random.Random(1))["step"] == 2
    assert train.guard(again) is None  # no retention set: no guard
