"""The whole story on one machine, with progress shown (the README's demo command runs it):

    python -m loadtests.demo [--work out/demo]

1. Synthesise speech: clean, drifted (accented voices at 10 dB SNR), replayed and golden clean,
   the drift's acoustics over broad text (for the retrain) and over sentences in no training
   text (the gate's generalisation set).
2. Start the stack on demo settings (30-s drift windows, 15-s rollout intervals, so the story
   fits in minutes) in a fresh data directory: Ray Serve; a minute of clean traffic pinned as
   the drift reference; the drift monitor with its retrain trigger, the promotion controller
   and Prometheus.
3. Stationary traffic (clean speech): the monitor's windows find no drift.
4. Drifted traffic whose answers the clients correct (POST /v1/feedback): a drift verdict; with
   enough corrections the monitor's trigger submits a retrain as a Ray job.
5. The retrain adapts the encoder's top layers to the drift's acoustics (corrections and broad
   text), evaluates the candidate against the stable on held-out corrections, the generalisation
   set and each golden part, and deploys it as canary; the controller steps it
   up on live Prometheus metrics while mixed traffic goes on, and promotes it.
6. A deliberately bad candidate (the new stable with noise added to its decoder) is made
   canary; the controller rolls it back.
7. A summary: the timeline of decisions, WER before and after on the drifted slice and the
   golden set, and where the drift report, evaluation report and dashboards are.

Traffic pauses while the retrain trains (two cores cannot serve and train at full speed).
Exits 1 when a step of the story does not happen (each wait has a deadline).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from asrops.engines.slice_gate import GATE_DIR, gate_dir, load_gate
from asrops.evaluation import core_english_clips
from asrops.synth import PRESETS, generate, speaking, split_templates
from loadtests import speech_settings

log = logging.getLogger("asrops.demo")

DRIFT = PRESETS["drift-accent-noise"]
ACOUSTIC_CLIPS = 150
"""Clips of the drift's voices and noise speaking broad text, for the retrain."""
GOLDEN_CLIPS = 40
"""Clips of each golden part (clean synthetic, real English speech) the gate judges one by one."""
GENERALISATION_CLIPS = 40
"""Clips of the drift speaking sentences in no training text: the gate's generalisation set."""
REAL_REPLAY_CLIPS = 60
ADMIN_TOKEN = "demo-admin-token"
CLIENT_KEYS = [f"demo-client-{i}" for i in range(8)]
"""The demo's client apps: corrections count by client (API key), and a retrain or a canary's
feedback WER needs several (retrain.trigger.min_label_clients)."""


def demo_env(data_dir: Path, replay: Path, golden: Path, acoustic: Path, generalisation: Path,
             real_replay: Path | None) -> dict[str, str]:
    """Settings of the demo, as environment variables so that the monitor, the controller and
    the retrain job (separate processes) read the same ones."""
    return {
        "ASROPS_DATA_DIR": str(data_dir),
        "ASROPS_SERVE__ADMIN_TOKENS": json.dumps([ADMIN_TOKEN]),
        "ASROPS_SERVE__API_KEYS": json.dumps(CLIENT_KEYS),
        "ASROPS_MONITORING__SCRAPE_INTERVAL_S": "2",
        "ASROPS_MONITORING__DRIFT__WINDOW_S": "20",
        "ASROPS_MONITORING__DRIFT__MIN_SAMPLES": "20",
        # The demo pins a minute of its own clean traffic as the reference: no synthetic bootstrap
        # beside it in the monitor (two minutes of CPU the first windows would wait for).
        "ASROPS_MONITORING__DRIFT__BOOTSTRAP_REFERENCE": "false",
        "ASROPS_MONITORING__PRODUCTION_LOG__RECENT_AUDIO_S": "1800",
        # 150 corrections (the default asks for 50): with the drift's acoustics over broad text
        # beside them, enough for the retrain and a held-out template split of about 20.
        "ASROPS_RETRAIN__TRIGGER__MIN_NEW_LABELS": "150",
        # Temperature fallback in steps of 0.4 (0.4, 0.8) instead of openai/whisper's 0.2: half
        # the decoding time on the drift's noisy speech (48 drifted clips: 32 s against 59 s,
        # WER 111.4 % against 110.4 %), for serving, validation and the gate alike.
        "ASROPS_ENGINE__TEMPERATURE_INCREMENT": "0.4",
        "ASROPS_RETRAIN__TRIGGER__COOLDOWN_S": "0",
        "ASROPS_RETRAIN__REPLAY_MANIFESTS": json.dumps([str(replay)]),
        # The drift's acoustics over broad text (what the retrain learns from beside the
        # corrections), and the same drift over sentences in no training text (what the gate
        # judges generalisation on). The drift is the demo's own: on a real service, synthesise
        # or record the drift's voices, noise and channel the drift report shows.
        "ASROPS_RETRAIN__ACOUSTIC_MANIFESTS": json.dumps([str(acoustic)]),
        "ASROPS_RETRAIN__GENERALISATION_MANIFESTS": json.dumps([str(generalisation)]),
        "ASROPS_RETRAIN__GOLDEN_MANIFESTS": json.dumps([str(golden), *_speech_manifest()]),
        "ASROPS_RETRAIN__GOLDEN_CLIPS": str(GOLDEN_CLIPS),
        # Real speech after the golden clips, labelled by the parent: replayed against forgetting,
        # and what the slice gate learns known-good speech sounds like beside the clean replay.
        "ASROPS_RETRAIN__SELF_LABEL_MANIFESTS": json.dumps([str(real_replay)] if real_replay else []),
        # The retrain's defaults (the encoder's top layers at 1e-4, 75 % replay, the forgetting guard) with 30 steps
        # instead of 60, validated every 15, for the demo's time budget.
        "ASROPS_RETRAIN__TRAIN__MAX_STEPS": "30",
        "ASROPS_RETRAIN__TRAIN__EVAL_EVERY_STEPS": "15",
        # The analysis's default evidence (20 canary requests a window, AnalysisSpec.min_requests):
        # the service answers the demo's mixed traffic at about 1.3-1.6 requests/s on 2 cores, so
        # a 60-s window holds 20 canary requests only at 50 %: one step, straight to 50 %; two
        # failed checks in a row (the default is 3) roll it back.
        "ASROPS_PROMOTION__ANALYSIS__INTERVAL_S": "20",
        "ASROPS_PROMOTION__ANALYSIS__WINDOW_S": "60",
        "ASROPS_PROMOTION__ANALYSIS__STEP_WEIGHTS": "[50]",
        "ASROPS_PROMOTION__ANALYSIS__THRESHOLD": "2",
        "ASROPS_PROMOTION__ANALYSIS__INIT_TIMEOUT_S": "300",
    }


def _speech_manifest() -> list[str]:
    speech = speech_settings().speech_manifest
    return [str(speech)] if speech else []


class Story:
    """Progress lines with the elapsed time, and the timeline the summary prints."""

    def __init__(self):
        self.started = time.monotonic()
        self.timeline: list[str] = []

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}", flush=True)

    def mark(self, message: str) -> None:
        self.timeline.append(f"{datetime.now(UTC):%H:%M:%S} {message}")
        self.say(f"** {message}")


def wait_for(what: str, check: Callable[[], object], timeout_s: float, say: Callable[[str], None],
             every_s: float = 5.0, report: Callable[[], str] | None = None):
    """Poll `check` until it returns something truthy; saying what is awaited every ~30 s."""
    deadline, last_note = time.monotonic() + timeout_s, 0.0
    while time.monotonic() < deadline:
        if value := check():
            return value
        if time.monotonic() - last_note >= 30:
            say(f"waiting for {what}" + (f": {report()}" if report else ""))
            last_note = time.monotonic()
        time.sleep(every_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")


class Traffic:
    """Clients sending a mix of manifests in the background until stopped."""

    def __init__(self, url: str, mix, rate_per_s: float, correct_share: float = 0.0):
        self.url, self.mix, self.rate, self.correct_share = url, mix, rate_per_s, correct_share
        self.statuses: dict[str, int] = {}
        self.corrections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from asrops.monitoring.simulate import simulate

        seed = 0
        while not self._stop.is_set():
            seed += 1
            r = simulate(self.url, self.mix, self.rate, count=max(1, round(self.rate * 5)), seed=seed,
                         correct_share=self.correct_share, api_keys=CLIENT_KEYS)
            self.corrections += r.corrections
            for k, v in r.statuses.items():
                self.statuses[k] = self.statuses.get(k, 0) + v

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def failed(self) -> int:
        return sum(v for k, v in self.statuses.items() if k != "200")


def make_bad_candidate(registry, parent: str, work: Path, say: Callable[[str], None]) -> str:
    """The parent with Gaussian noise (30 % of each weight's spread) on its decoder's layers:
    it still answers, with worse words, less confidence and longer, repetitive outputs."""
    import torch
    from safetensors.torch import load_file, save_file

    from asrops.models.importer import publish_checkpoint

    src, out = registry.fetch(parent), work / "bad-candidate"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("onnx", "reports", GATE_DIR))  # publishing re-exports
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.startswith("model.decoder.layers.") and tensor.dtype.is_floating_point and tensor.dim() == 2:
            tensor += 0.3 * tensor.std() * torch.randn(tensor.shape, generator=generator)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    manifest = publish_checkpoint(registry, out, family="whisper", parent=parent, progress=say,
                                  source="loadtests/demo.py: a deliberately bad candidate (decoder weights + noise)")
    return manifest.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("out/demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    story = Story()
    say = story.say
    work = args.work.resolve()
    shutil.rmtree(work / "data", ignore_errors=True)  # a fresh story every run (the speech is kept)

    say("1/7 synthesising speech (espeak-ng, flite)")
    replay_templates, golden_templates = split_templates(test_fraction=0.5, seed=5)
    clean = PRESETS["clean"]
    traffic_clean = generate(clean.model_copy(update={"n": 120, "seed": 31}), work / "clean", say)
    drifted = generate(DRIFT.model_copy(update={"n": 300, "seed": 21}), work / "drifted", say)
    replay = generate(clean.model_copy(update={"n": 150, "seed": 22, "template_ids": replay_templates}),
                      work / "replay", say)
    golden = generate(clean.model_copy(update={"n": GOLDEN_CLIPS, "seed": 23, "template_ids": golden_templates}),
                      work / "golden", say)
    acoustic = generate(speaking(DRIFT, "broad", ACOUSTIC_CLIPS, 2021), work / "acoustic", say)
    generalisation = generate(speaking(DRIFT, "unseen", GENERALISATION_CLIPS, 1021), work / "generalisation", say)
    speech = _speech_manifest()
    real_replay = core_english_clips(Path(speech[0]), GOLDEN_CLIPS, REAL_REPLAY_CLIPS, work / "replay-real.jsonl") \
        if speech else None
    os.environ.update(demo_env(work / "data", replay, golden, acoustic, generalisation, real_replay))

    from ray import serve

    from asrops.cli.stack import start_monitoring
    from asrops.monitoring.dashboards import DASHBOARD_FILE
    from asrops.monitoring.prometheus import PrometheusClient, PrometheusError
    from asrops.monitoring.reference import pin_window
    from asrops.monitoring.simulate import MixPart, simulate
    from asrops.prodlog import store_for
    from asrops.promotion import rollout
    from asrops.promotion.state import Phase
    from asrops.registry import ModelRegistry
    from asrops.retrain.trigger import jobs_address, jobs_client, retrain_jobs
    from asrops.serve.launcher import VersionReconciler, run_local
    from asrops.settings import Settings

    settings = Settings()
    jobs_api = jobs_address(settings.retrain.trigger)
    say(f"2/7 starting the service in {settings.data_dir} (first run imports the embedded model)")
    url = run_local(settings, say)
    clean_mix = [MixPart(manifest=traffic_clean, weight=1)]
    say("    the drift reference: one minute of live clean traffic, pinned (`asrops drift reference --from --to`)")
    pinned_from = datetime.now(UTC)
    result = simulate(url, clean_mix, rate_per_s=2.0, count=120, api_keys=CLIENT_KEYS)
    time.sleep(2 * settings.monitoring.production_log.flush_interval_s)  # the log's last flush
    reference = pin_window(store_for(settings), pinned_from, datetime.now(UTC))
    say(f"    reference: {len(reference)} answered requests ({result.statuses})")
    stack = start_monitoring(settings, say)
    registry = ModelRegistry.from_settings(settings)
    reconciler_stop = VersionReconciler(settings, registry).in_background(say=say)
    prometheus = PrometheusClient(settings.prometheus_url)
    stable0 = registry.resolve("stable")
    story.mark(f"stack up at {url}; stable is {stable0}")

    def verdict() -> str:
        try:
            value = prometheus.query_value("max(asrops_drift_verdict)")
        except PrometheusError as exc:
            return f"unknown ({exc})"
        return {1.0: "drift", 0.0: "no drift", -1.0: "not enough data"}.get(value, str(value))

    drift_mix = [MixPart(manifest=drifted, weight=1)]
    try:
        say("3/7 stationary traffic: clean synthetic speech, 2 requests/s until two windows are judged")
        with Traffic(url, clean_mix, 2.0) as t:
            wait_for("a judged window without drift", lambda: verdict() == "no drift", 300, say,
                     report=verdict)
            story.mark(f"stationary traffic: verdict '{verdict()}' ({t.statuses})")

        say("4/7 drifted traffic: accented voices in 10 dB noise; clients correct every answer")
        with Traffic(url, drift_mix, 3.0, correct_share=1.0) as t:
            wait_for("a drift verdict", lambda: verdict() == "drift", 600, say, report=verdict)
            story.mark(f"drift verdict; {t.corrections} corrections so far")
            needed = settings.retrain.trigger.min_new_labels
            job = wait_for(f"the trigger to submit a retrain ({needed} corrections needed)",
                           lambda: next(iter(retrain_jobs(jobs_api)), None), 600, say,
                           report=lambda: f"{t.corrections} corrections, verdict {verdict()}")
            story.mark(f"retrain job {job.job_id} submitted by the monitor's trigger after "
                       f"{t.corrections} corrections ({t.statuses})")

        say("5/7 retraining (Ray job: dataset, fine-tuning, evaluation gate); traffic paused")
        client, printed = jobs_client(jobs_api), 0

        def job_done():
            nonlocal printed
            lines = client.get_job_logs(job.job_id).splitlines()
            for line in lines[printed:]:
                if any(k in line for k in ("step ", "gate", "trained", "data:", "published", "WER", "evaluating")):
                    say(f"  retrain | {line.strip()[-160:]}")
            printed = len(lines)
            status = str(client.get_job_status(job.job_id))
            return status if status.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED") else None

        status = wait_for("the retrain job", job_done, 1200, say, every_s=10)
        candidate = rollout.current(registry).rollout.canary_version
        story.mark(f"retrain job {status}; canary {candidate}")
        if candidate is None:
            say("the candidate did not pass the evaluation gate: nothing to roll out (see the job's log)")
            return 1

        say("6/7 the controller steps the canary up on live metrics (mixed traffic, some corrected)")
        printed_decisions = 0

        def rollout_ended():
            nonlocal printed_decisions
            state = rollout.read_analysis(registry)
            if state is None or state.canary_version != candidate_now:
                return None
            for d in state.history[printed_decisions:]:
                checks = ", ".join(f"{c.name}={c.canary if c.canary is None else round(c.canary, 4)}"
                                   f"{'' if c.passed else ' (FAIL)' if c.passed is False else ' (skipped)'}"
                                   for c in d.checks)
                story.mark(f"controller: {d.action} at {d.weight} % ({d.reason})" + (f" [{checks}]" if checks else ""))
            printed_decisions = len(state.history)
            return state if state.phase in (Phase.SUCCEEDED, Phase.FAILED) else None

        mixed = [MixPart(manifest=drifted, weight=1), MixPart(manifest=traffic_clean, weight=1)]
        candidate_now = candidate
        with Traffic(url, mixed, 2.0, correct_share=0.3) as t:
            good = wait_for("the canary's rollout to end", rollout_ended, 900, say, every_s=2)
            story.mark(f"good canary: {good.phase}; client requests {t.statuses}")

        say("7/7 a deliberately bad candidate (decoder weights + noise) as canary")
        bad = make_bad_candidate(registry, registry.resolve("stable"), work, say)
        printed_decisions, candidate_now = 0, bad
        with Traffic(url, mixed, 2.0) as t:
            rollout.deploy_canary(registry, bad, weight=0, shadow_share=0, actor="demo", reason="a bad candidate")
            story.mark(f"bad candidate {bad} deployed as canary")
            bad_state = wait_for("the bad canary's rollout to end", rollout_ended, 900, say, every_s=2)
            story.mark(f"bad canary: {bad_state.phase}; client requests {t.statuses}")
    finally:
        reconciler_stop.set()
        stack.stop()
        serve.shutdown()

    _summary(story, registry, settings, stable0, good, bad_state, DASHBOARD_FILE)
    return 0 if good.phase == Phase.SUCCEEDED and bad_state.phase == Phase.FAILED else 1


def _summary(story: Story, registry, settings, stable0: str, good, bad, dashboard: Path) -> None:
    from asrops.retrain.evaluate import REPORT_JSON, EvaluationReport, summary_lines

    report = registry.fetch(good.canary_version) / "reports" / "evaluation.md"
    print("\n=== summary ===")
    print("timeline:")
    for line in story.timeline:
        print(f"  {line}")
    print(f"retrained version {good.canary_version} (parent {stable0}): {good.phase}; "
          f"bad candidate {bad.canary_version}: {bad.phase}")
    evaluation = EvaluationReport.model_validate_json((report.parent / REPORT_JSON).read_text())
    for line in summary_lines(evaluation):
        print(f"  {line}")
    gate_path = gate_dir(report.parent.parent)
    if gate_path is None:
        print("  slice gate: none (the retrained encoder serves all audio)")
    else:
        gate = load_gate(gate_path)
        print(f"  slice gate: fitted on {gate.fitted_on}; on the clips it was checked on {gate.validation}")
    print(f"evaluation report: {report}")
    print(f"drift reports: {settings.production_log_uri}/drift-reports/ (open the .html)")
    print(f"dashboard to import into Grafana: {dashboard}; alert rules: monitoring/prometheus/alerts.yml")
    print(f"every rollout change, with who and why: {settings.registry_uri}/audit/ "
          "(`asrops rollout audit` while the service runs)")
    print(f"total {time.monotonic() - story.started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
