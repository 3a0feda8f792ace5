"""One retrain, start to end: data → fine-tune → evaluate against the stable → publish and
deploy as canary, only if the gate passes.

This is what a retrain Ray job runs (`asrops retrain run`). Each stage writes under the job's
work directory (`<data_dir>/retrain/<job>/`): `data/` (manifests and the data report),
`model/` (the best checkpoint), `evaluation/` (the evaluation report). A published candidate
carries both reports among its files.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel

from asrops.audio import decode_audio
from asrops.clip_manifest import write_rows
from asrops.engines import load_engine
from asrops.engines.slice_gate import SliceGate
from asrops.evaluation import core_english_filter, load_manifest
from asrops.models.importer import build_version_dir
from asrops.prodlog import store_for
from asrops.promotion import rollout
from asrops.registry import ModelRegistry
from asrops.registry.datasets import REF_PREFIX, DatasetStore, is_dataset_ref
from asrops.registry.manifest import new_version_id
from asrops.retrain.dataset import (
    BuiltDataset,
    Example,
    build_dataset,
    examples_from_feedback,
    examples_from_manifest,
)
from asrops.retrain.evaluate import (
    EvaluationReport,
    SetComparison,
    compare,
    gate,
    transcribe_manifest,
    write_report,
)
from asrops.retrain.slice_gate import attach_slice_gate, fit_slice_gate, routed_manifest
from asrops.retrain.train import TrainJob, TrainResult, run_training
from asrops.settings import Settings

log = logging.getLogger(__name__)


class RetrainOutcome(BaseModel):
    job: str
    cause: str
    reason: str
    parent: str
    dataset_report: Path
    train: TrainResult
    slice_gate: SliceGate | None = None
    """The gate the candidate carries (None: its retrained encoder serves all audio)."""
    evaluation_json: Path
    evaluation_md: Path
    passed: bool
    reasons: list[str]
    published: str | None = None
    """The new version, when the gate passed."""
    seconds: float


class EvalSet(BaseModel):
    """One set the gate judges on its own, as a manifest of absolute paths."""

    name: str
    manifest: Path


def _capped_sets(manifests: list[tuple[str, Path, Callable | None]], cap: int, out_dir: Path) -> list[EvalSet]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = []
    for i, (name, manifest, keep) in enumerate(manifests):
        items = load_manifest(manifest, filter=keep)[: cap or None]
        rows = ({**(item.model_extra or {}), "audio": item.audio, "text": item.text} for item in items)
        sets.append(EvalSet(name=name, manifest=write_rows(out_dir / f"{i}-{manifest.parent.name}.jsonl", rows)))
    return sets


def _named(ref: str | Path, datasets: DatasetStore) -> tuple[str, Path]:
    """A manifest setting as (the name reports give it, a local manifest)."""
    manifest = datasets.resolve(ref)
    return (str(ref).removeprefix(REF_PREFIX) if is_dataset_ref(ref) else manifest.parent.name), manifest


def prepare_golden(settings: Settings, out_dir: Path) -> list[EvalSet]:
    """The pinned regression set's parts, at most `golden_clips` rows each: the configured
    manifests (or registry datasets), else the core English subset of the real speech beside
    the checkout (when present). Each part is judged on its own."""
    speech, datasets = settings.speech_manifest, DatasetStore.from_settings(settings)
    configured = [_named(ref, datasets) for ref in settings.retrain.golden_manifests]
    if not configured and speech:
        configured = [("real English speech", speech)]

    def part(name: str, manifest: Path) -> tuple[str, Path, Callable | None]:
        if speech and manifest.resolve() == speech.resolve():  # it also lists other languages and styles
            return "real English speech", manifest, core_english_filter
        return name, manifest, None

    return _capped_sets([part(*named) for named in configured], settings.retrain.golden_clips, out_dir)


def prepare_generalisation(settings: Settings, out_dir: Path) -> list[EvalSet]:
    """The configured generalisation sets (the drift over sentences no training text has), at
    most `golden_clips` rows each."""
    datasets = DatasetStore.from_settings(settings)
    named = [_named(ref, datasets) for ref in settings.retrain.generalisation_manifests]
    return _capped_sets([(name, manifest, None) for name, manifest in named], settings.retrain.golden_clips, out_dir)


@dataclass
class Gathered:
    """A retrain's labelled data before validation and splitting, by what it may be used for."""

    new: list[Example]
    """Feedback corrections and curated clips: trained on and held out (by group)."""
    acoustic: list[Example]
    """The drift's acoustics over broad text: trained on only."""
    replay: list[Example]
    retention: list[Example]


def gather_examples(settings: Settings, work: Path, since: datetime, parent_dir: Path,
                    say: Callable[[str], None] = log.info) -> Gathered:
    """New labelled data (feedback with audio since `since`, curated manifests), the drift's
    acoustics over broad text, replay data (the parent's recorded training manifest, if any, and
    audio it labels itself) and retention-only data."""
    fields, by = settings.retrain.dataset.slice_fields, settings.retrain.dataset.hold_out_by
    datasets = DatasetStore.from_settings(settings)
    new = examples_from_feedback(store_for(settings), since, datetime.now(UTC), work / "feedback", fields,
                                 settings.retrain.dataset.max_client_share)
    for ref in settings.retrain.curated_manifests:
        new += examples_from_manifest(datasets.resolve(ref), "curated", fields, by)
    acoustic = [e for ref in settings.retrain.acoustic_manifests
                for e in examples_from_manifest(datasets.resolve(ref), "acoustic", fields, by)]
    replay = []
    for ref in settings.retrain.replay_manifests:
        replay += examples_from_manifest(datasets.resolve(ref), "replay", fields, by)
    for i, ref in enumerate(settings.retrain.self_label_manifests):
        name, manifest = _named(ref, datasets)
        out = work / "self-labelled" / f"{i}-{name}.jsonl"
        labelled = self_label(settings, parent_dir, manifest, out, say)
        replay += examples_from_manifest(labelled, "self_labelled", fields, by)
    retention = []
    for ref in settings.retrain.retention_manifests:
        retention += examples_from_manifest(datasets.resolve(ref), "retention", fields, by)
    return Gathered(new=new, acoustic=acoustic, replay=replay, retention=retention)


def self_label(settings: Settings, parent_dir: Path, manifest: Path, out: Path, say: Callable[[str], None]) -> Path:
    """`manifest`'s clips with the parent's own transcripts as labels (only those it decodes as
    one segment: training labels are one segment per clip), decoded as the service decodes."""
    engine = serving_engine(settings, parent_dir)
    items = load_manifest(manifest)
    options = settings.engine.decode_options()
    rows = []
    n = settings.engine.offline_batch_size
    for start in range(0, len(items), n):
        batch = items[start : start + n]
        results = engine.transcribe([decode_audio(Path(item.audio).read_bytes()).samples for item in batch], options)
        for item, result in zip(batch, results, strict=True):
            if len(result.segments) == 1 and result.text.strip():
                rows.append({**(item.model_extra or {}), "audio": item.audio, "text": result.text.strip()})
        say(f"self-labelling {manifest.name}: {min(start + n, len(items))}/{len(items)} clips")
    write_rows(out, rows)
    say(f"self-labelled {len(rows)} of {len(items)} clips of {manifest} (the rest were not one segment)")
    return out


def serving_engine(settings: Settings, model_dir: Path):
    """A version on the engine that serves it (`engine.kind`), with the retrain's threads."""
    return load_engine(model_dir, settings.engine.kind, settings.engine.device,
                       settings.retrain.train.threads or settings.engine.threads, settings.engine.short_windows)


class Comparisons(BaseModel):
    heldout: SetComparison
    generalisation: list[SetComparison]
    golden: list[SetComparison]


def _evaluate(settings: Settings, candidate_dir: Path, stable_dir: Path, data: BuiltDataset,
              golden: list[EvalSet], generalisation: list[EvalSet], say: Callable[[str], None]) -> Comparisons:
    """Both versions on the engine that serves them (`engine.kind`), so the gate judges what
    clients would get (and onnx-int8 evaluates about twice as fast as torch on a CPU)."""
    engines = {name: serving_engine(settings, d) for name, d in (("stable", stable_dir), ("candidate", candidate_dir))}
    g = settings.retrain.gate

    def compared(name: str, manifest: Path) -> SetComparison:
        results = {}
        for version, engine in engines.items():
            say(f"evaluating {version} on {name} ({manifest.name})")  # each logs its own progress
            results[version] = transcribe_manifest(engine, manifest, batch_size=settings.engine.offline_batch_size)
        return compare(results["candidate"], results["stable"], g, name)

    return Comparisons(heldout=compared("held-out new data", data.test),
                       generalisation=[compared(s.name, s.manifest) for s in generalisation],
                       golden=[compared(s.name, s.manifest) for s in golden])


def run_retrain(settings: Settings, cause: str, reason: str, say: Callable[[str], None] = log.info,
                gpus_available: bool = False) -> RetrainOutcome:
    started = time.monotonic()
    registry = ModelRegistry.from_settings(settings)
    parent = registry.resolve("stable")
    job = f"retrain-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    work = (settings.retrain.work_dir or settings.data_dir / "retrain") / job
    say(f"{job}: {cause} ({reason}); parent {parent}; work dir {work}")

    stable_dir = registry.fetch(parent)
    since = datetime.now(UTC) - timedelta(days=settings.retrain.feedback_lookback_days)
    gathered = gather_examples(settings, work, since, stable_dir, say)
    golden_sets = prepare_golden(settings, work / "golden")
    general_sets = prepare_generalisation(settings, work / "generalisation")
    fields, by = settings.retrain.dataset.slice_fields, settings.retrain.dataset.hold_out_by
    # Both kinds of judged set are kept out of training (their audio, groups and sentences).
    judged = [e for judged_set in (*golden_sets, *general_sets)
              for e in examples_from_manifest(judged_set.manifest, "golden", fields, by)]
    say(f"data: {len(gathered.new)} new labelled examples, {len(gathered.acoustic)} of the drift's acoustics, "
        f"{len(gathered.replay)} replayable, {len(gathered.retention)} retention-only, "
        f"{len(judged)} golden or generalisation")
    data = build_dataset(gathered.new, judged, gathered.replay, settings.retrain.dataset, work / "data",
                         gathered.retention, acoustic=gathered.acoustic)
    say(f"data report: {data.report_md}")

    recipe = settings.retrain.train
    if recipe.train_decoder == "none" and not recipe.lora:
        slice_gate = fit_slice_gate(data.train, data.validation, stable_dir, parent, settings.retrain.slice_gate, say)
    else:  # the gate's two paths share the parent's decoder
        slice_gate = None
        say(f"slice gate: none (the recipe trains the decoder: train_decoder={recipe.train_decoder}, "
            f"lora={recipe.lora}); the candidate serves all audio")
    retention = data.retention
    if slice_gate is not None:  # only what the gate sends to the retrained layers can be forgotten
        retention = routed_manifest(data.retention, slice_gate, stable_dir, work / "data" / "retention-routed.jsonl",
                                    say)
    train = run_training(TrainJob(
        parent_dir=stable_dir, train_manifest=data.train, validation_manifest=data.validation,
        retention_manifest=retention,
        decode=settings.engine.decode_options(), decode_batch_size=settings.engine.offline_batch_size,
        storage_path=str(checkpoint_root(settings)), name=job, output_dir=work / "model",
        settings=settings.retrain.train), gpus_available)
    say(f"trained {train.steps} steps in {train.seconds:.0f} s ({train.samples_per_s:.1f} samples/s); "
        f"best validation WER {train.best_validation_wer}; forgetting guard: "
        f"{'none (no retention set)' if train.guard is None else f'weight {train.guard.kept_weight:g} kept'}")

    say("exporting the candidate to ONNX (what it will be served as)")
    candidate_dir = build_version_dir(train.output_dir, work / "version", say)
    if slice_gate is not None and not attach_slice_gate(candidate_dir, stable_dir, slice_gate, say):
        slice_gate = None
    eval_started = datetime.now(UTC)
    compared = _evaluate(settings, candidate_dir, stable_dir, data, golden_sets, general_sets, say)
    decision = gate(compared.heldout, compared.golden, settings.retrain.gate, compared.generalisation)
    report = EvaluationReport(candidate_version=f"{job} (unpublished)", stable_version=parent,
                              heldout=compared.heldout, generalisation=compared.generalisation,
                              golden=compared.golden, decision=decision, gate=settings.retrain.gate,
                              engine=settings.engine.kind, started_at=eval_started, finished_at=datetime.now(UTC))
    json_path, md_path = write_report(report, work / "evaluation")
    for line in decision.reasons:
        say(f"gate: {line}")
    published = None
    if decision.passed:
        published = _publish_and_deploy(settings, registry, candidate_dir, data, report, json_path, md_path,
                                        parent, cause, reason, say)
    else:
        say(f"gate failed: nothing published (report {md_path})")
    return RetrainOutcome(job=job, cause=cause, reason=reason, parent=parent, dataset_report=data.report_md,
                          train=train, slice_gate=slice_gate, evaluation_json=json_path, evaluation_md=md_path,
                          passed=decision.passed,
                          reasons=decision.reasons, published=published, seconds=time.monotonic() - started)


def checkpoint_root(settings: Settings) -> Path | str:
    """Checkpoints live beside the registry's versions (its directory, or its S3 prefix)."""
    uri = settings.registry_uri
    return f"{uri.rstrip('/')}-checkpoints" if uri.startswith("s3://") else Path(uri).parent / "checkpoints"


def _publish_and_deploy(settings: Settings, registry: ModelRegistry, candidate_dir: Path, data: BuiltDataset,
                        report: EvaluationReport, json_path: Path, md_path: Path, parent: str, cause: str,
                        reason: str, say: Callable[[str], None]) -> str:
    """Publish the evaluated directory itself (its ONNX files are the ones the gate judged),
    with the reports beside the weights."""
    reports = {"evaluation.json": json_path, "evaluation.md": md_path, "data.json": data.report_json,
               "data.md": data.report_md, "train.jsonl": data.train}
    (candidate_dir / "reports").mkdir(exist_ok=True)
    for name, src in reports.items():
        shutil.copy2(src, candidate_dir / "reports" / name)
    manifest = registry.publish(
        candidate_dir, id=new_version_id("whisper"), family="whisper", parent=parent,
        source=f"retrain ({cause}): {reason}", notes=f"fine-tuned from {parent}; evaluation in reports/evaluation.md",
        eval_metrics=_manifest_metrics(report), data_fingerprint=hashlib.sha256(data.train.read_bytes()).hexdigest(),
        progress=say,
    )
    g = settings.retrain.gate
    rollout.deploy_canary(registry, manifest.id, weight=g.canary_weight, shadow_share=g.shadow_share,
                          actor="retrain", reason=f"passed the evaluation gate ({cause})")
    say(f"published {manifest.id}; canary at weight {g.canary_weight}, shadow share {g.shadow_share}")
    return manifest.id


def _manifest_metrics(report: EvaluationReport) -> dict[str, float]:
    """The gate's headline figures, kept in the version's manifest."""
    out = {}
    named = [("heldout", report.heldout), *((f"generalisation_{i}", c) for i, c in enumerate(report.generalisation)),
             *((f"golden_{i}", c) for i, c in enumerate(report.golden))]
    for name, compared in named:
        overall = compared.overall
        out[f"{name}_wer"] = overall.candidate.wer
        out[f"{name}_cer"] = overall.candidate.cer
        out[f"{name}_stable_wer"] = overall.stable.wer
        if overall.interval:
            out[f"{name}_wer_diff_low"] = overall.interval.low
            out[f"{name}_wer_diff_high"] = overall.interval.high
    return out
