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
    # the decoder learning on the frozen encoder's int8 outputs; the next but one test takes the default recipe
    settings = TrainSettings(max_steps=2, batch_size=2, eval_every_steps=1, threads=2, warmup_steps=0,
                             train_encoder_top_layers=0, train_decoder="all")
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


def test_top_encoder_layers_learn_on_cached_frozen_layers_and_the_decoder_stays_the_parents(job):
    """The drift recipe: the encoder's top layers learn, on the frozen layers' output computed
    once per clip; the decoder (the language model that memorises sentences) is the parent's."""
    defaults = TrainSettings()
    assert (defaults.train_encoder_top_layers, defaults.train_decoder) == (2, "none")
    # in fp32, so the cached path can be compared with the whole encoder exactly
    settings = job.settings.model_copy(update={"train_encoder_top_layers": 2, "train_decoder": "none",
                                               "mixed_precision": "no", "replay_encoder_weight": 1.0})
    run = train.setup(job.model_copy(update={"settings": settings}), torch.device("cpu"))
    encoder = train._base(run.model).model.encoder
    learning = {name for name, p in run.model.named_parameters() if p.requires_grad}
    assert learning and all(name.startswith(("model.encoder.layers.2.", "model.encoder.layers.3.",
                                             "model.encoder.layer_norm.")) for name in learning), learning
    # what is cached is the input of layer 2; the top two layers and the norm make the encoder's output
    features = train._features(run.processor.feature_extractor, run.train_audio[:2])
    with torch.no_grad():
        whole = encoder(torch.from_numpy(features)).last_hidden_state
        assert torch.allclose(train.top_of_encoder(run.model, run.cached[:2], 2), whole, atol=1e-5)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    train.resume(run, None)
    run.replayed = [True] * len(run.train_rows)  # as if every clip were replayed known-good speech
    first = train.train_step(run, random.Random(0))
    # the model starts as the parent, and both terms that hold it there see it move
    assert first["replay_kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["replay_encoder_change"] == pytest.approx(0.0, abs=1e-6)
    second = train.train_step(run, random.Random(0))
    assert second["replay_kl"] > 1e-6 and second["replay_encoder_change"] > 1e-8
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.encoder.layers.3.fc1.weight" in changed
    assert not {k for k in changed if k.startswith(("model.decoder.", "proj_out."))}
    assert not {k for k in changed if k.startswith(("model.encoder.layers.0.", "model.encoder.conv"))}
