"""The drift scenario, end to end on one machine: traffic moves to accented, noisy speech; the
stable's WER there is W0; a retrain on at most 300 labelled clips of that slice must give a
candidate at most 0.7 x W0 on the slice's held-out part (by default sentences of templates
it never trained on; `--hold-out-by sentence`: only the sentences are new) and no worse than 2 % relative on the golden set (the real speech beside the
checkout plus the original clean synthetic slice).

    python -m retrain.scenario [--work DIR] [--labelled 300]

Prints the figures and where the reports are; exits 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from asrops.settings import Settings
from asrops.synth import PRESETS, SynthSpec, generate, split_templates

log = logging.getLogger("asrops.retrain.scenario")

DRIFT = SynthSpec(voices=["en-gb-scotland", "en-029"], rate=(185, 205), snr_db=10, noise="white",
                  domains=["medical", "numbers"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("out/retrain-scenario"))
    parser.add_argument("--labelled", type=int, default=300, help="labelled clips of the drifted slice")
    parser.add_argument("--replay", type=int, default=60, help="clean synthetic clips replayed in training")
    parser.add_argument("--golden-clean", type=int, default=120, help="clean synthetic clips in the golden set")
    parser.add_argument("--golden-real", type=int, default=100, help="real speech clips in the golden set")
    parser.add_argument("--hold-out-by", choices=["template", "sentence"], default="template",
                        help="what held-out clips never share with training (DatasetSettings.hold_out_by)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    say = log.info
    started = time.monotonic()

    work = args.work.resolve()
    drifted = generate(DRIFT.model_copy(update={"n": args.labelled, "seed": 21}), work / "drifted", say)
    # Replayed clean speech and the golden clean slice share no template: replaying the golden
    # set's sentences would be training on the regression set (the dataset builder drops them).
    replay_templates, golden_templates = split_templates(test_fraction=0.5, seed=5)
    clean = PRESETS["clean"]
    replay = generate(clean.model_copy(update={"n": args.replay, "seed": 22, "template_ids": replay_templates}),
                      work / "replay", say)
    golden = generate(clean.model_copy(update={"n": args.golden_clean, "seed": 23, "template_ids": golden_templates}),
                      work / "golden", say)

    from serve.launcher import init_ray

    settings = Settings(data_dir=work / "data")
    settings.retrain.curated_manifests = [drifted]
    settings.retrain.replay_manifests = [replay]
    speech = settings.speech_data_dir / "manifest.jsonl"
    settings.retrain.golden_manifests = [golden, *([speech] if speech.exists() else [])]
    settings.retrain.golden_clips = max(args.golden_clean, args.golden_real)
    settings.retrain.trigger.min_new_labels = 0
    settings.retrain.dataset.hold_out_by = args.hold_out_by

    from asrops.models.importer import import_embedded_default
    from asrops.registry import ModelRegistry
    from retrain.job import run_retrain
    from retrain.trigger import TriggerInputs, decide

    import_embedded_default(ModelRegistry.from_settings(settings), progress=say)
    decision = decide(TriggerInputs(now=datetime.now(UTC), drift_verdict="drift", new_labels=args.labelled),
                      settings.retrain.trigger)
    say(decision.log_message())
    init_ray(settings)
    outcome = run_retrain(settings, decision.cause.value, decision.reason, say)

    report = json.loads(outcome.evaluation_json.read_text())
    held, gold = report["heldout"]["overall"], report["golden"]["overall"]
    w0, w1 = held["stable"]["wer"], held["candidate"]["wer"]
    g0, g1 = gold["stable"]["wer"], gold["candidate"]["wer"]
    ok_slice, ok_golden = w1 <= 0.7 * w0, g1 <= g0 * 1.02
    lines = [
        f"drifted slice held out (by {args.hold_out_by}): stable W0 {w0:.2f} %, candidate {w1:.2f} % = {w1 / w0:.2f} x W0 "
        f"(goal <= 0.70); difference {held['wer_diff']:+.2f} points, 95 % CI "
        f"[{held['interval']['low']:+.2f}, {held['interval']['high']:+.2f}] ({held['n']} clips)",
        f"golden: stable {g0:.2f} %, candidate {g1:.2f} % ({(g1 / g0 - 1) * 100:+.1f} % relative, goal <= +2 %); "
        f"difference {gold['wer_diff']:+.2f} points, 95 % CI [{gold['interval']['low']:+.2f}, "
        f"{gold['interval']['high']:+.2f}] ({gold['n']} clips)",
        f"training: {outcome.train.steps} steps, {outcome.train.seconds:.0f} s, "
        f"{outcome.train.samples_per_s:.1f} samples/s; whole retrain {outcome.seconds:.0f} s; "
        f"scenario {time.monotonic() - started:.0f} s",
        f"gate: {'passed' if outcome.passed else 'failed'}; published {outcome.published}",
        f"reports: {outcome.dataset_report}, {outcome.evaluation_md}",
    ]
    for line in lines:
        print(line)
    (work / "summary.txt").write_text("\n".join(lines) + "\n")
    return 0 if ok_slice and ok_golden and outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
