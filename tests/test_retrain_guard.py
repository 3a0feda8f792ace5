"""retrain/train.py's forgetting guard: the fine-tuned weights are pulled back towards the
parent's, parent + a x (tuned - parent), at the largest weight a whose retention WER stays
within the limit; the parent itself when none does. The WERs here are stand-ins computed from the
weights (so each weight's outcome is known), the interpolation and the choice are the real code."""

from __future__ import annotations

import shutil

import pytest
import torch

from asrops.retrain.train import BEST_DIR, TrainJob, _forgetting_guard
from asrops.settings import TrainSettings

PROBE = "model.decoder.layers.0.fc1.weight"


@pytest.fixture(scope="module")
def tuned_job(stable_dir, tmp_path_factory):
    """A 'fine-tuned' checkpoint: the parent with one decoder weight shifted by 1.0."""
    from transformers import WhisperForConditionalGeneration

    out = tmp_path_factory.mktemp("guard")
    model = WhisperForConditionalGeneration.from_pretrained(stable_dir)
    with torch.no_grad():
        model.state_dict()[PROBE].add_(1.0)
    model.save_pretrained(out / BEST_DIR)
    for name in ("generation_config.json", "preprocessor_config.json"):
        if (stable_dir / name).exists():
            shutil.copy2(stable_dir / name, out / BEST_DIR / name)
    return TrainJob(parent_dir=stable_dir, train_manifest=out / "t.jsonl", validation_manifest=out / "v.jsonl",
                    storage_path=str(out / "ckpt"), name="guard", output_dir=out, settings=TrainSettings())


def _shift(model, parent_probe: torch.Tensor) -> float:
    """How far the probed weight is from the parent's: the interpolation weight a itself."""
    return float((model.state_dict()[PROBE] - parent_probe).mean())


def test_the_guard_keeps_the_largest_weight_within_the_retention_limit(tuned_job, stable_dir):
    from transformers import WhisperForConditionalGeneration

    parent_probe = WhisperForConditionalGeneration.from_pretrained(stable_dir).state_dict()[PROBE].clone()
    # Retention WER 10 % for the parent, rising 4 points per unit of a; limit 10.2 % (2 % relative)
    # allows a <= 0.05, so of the weights (1, 0.5, 0.04) only 0.04 passes.
    settings = TrainSettings(interpolation_weights=(0.5, 1.0, 0.04), max_retention_worsening=0.02)
    validation = lambda m: 50.0 - 20 * _shift(m, parent_probe)  # noqa: E731 (better with more of the tuning)
    # Two parts: one that only improves must not hide the other being forgotten.
    retention = lambda m: (7.0, {"real": 10.0 + 4 * _shift(m, parent_probe),  # noqa: E731
                                 "synthetic": 5.0 - 4 * _shift(m, parent_probe)})
    model, guard = _forgetting_guard(tuned_job, settings, torch.device("cpu"), validation, retention)

    assert [t.weight for t in guard.trials] == [1.0, 0.5, 0.04]  # largest first, stops at the first kept
    assert guard.kept_weight == 0.04 and guard.parent_retention_wer_by_part["real"] == pytest.approx(10.0)
    assert guard.retention_limits["real"] == pytest.approx(10.2)
    assert _shift(model, parent_probe) == pytest.approx(0.04, abs=1e-4)  # the model holds the kept weights
    assert guard.trials[0].validation_wer == pytest.approx(30.0, abs=1e-3)


def test_the_guard_falls_back_to_the_parent_when_every_weight_forgets(tuned_job, stable_dir):
    from transformers import WhisperForConditionalGeneration

    parent_probe = WhisperForConditionalGeneration.from_pretrained(stable_dir).state_dict()[PROBE].clone()
    settings = TrainSettings(interpolation_weights=(1.0, 0.5), max_retention_worsening=0.02)
    retention = lambda m: (0.0, {"real": 10.0 + 4 * _shift(m, parent_probe)})  # noqa: E731
    model, guard = _forgetting_guard(tuned_job, settings, torch.device("cpu"), lambda m: 1.0, retention)
    assert guard.kept_weight == 0.0 and len(guard.trials) == 2
    assert _shift(model, parent_probe) == pytest.approx(0.0, abs=1e-6)
    # No limit: the largest weight, after one look.
    _, guard = _forgetting_guard(tuned_job, TrainSettings(interpolation_weights=(0.8, 1.0),
                                                          max_retention_worsening=None),
                                 torch.device("cpu"), lambda m: 1.0, retention)
    assert guard.kept_weight == 1.0 and len(guard.trials) == 1
