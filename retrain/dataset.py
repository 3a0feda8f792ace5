"""The retraining dataset: labelled clips in (feedback corrections, curated manifests, replayed
parent data, the golden set), validated, split and written as manifests with a data report.

    examples_from_feedback / examples_from_manifest -> validate -> split -> build_dataset

Every clip that is left out is counted under one reason (`DropReason`), with a few example ids,
so a report says what was thrown away and why. Splits are stratified by slice (the combination of
`DatasetSettings.slice_fields`) and grouped: a group (a synthetic template, else the sentence) is
never in two splits, since held-out sentences that share a template with training overstate a
retrain (on the drift scenario, a sentence-held-out split showed 0.53 x the parent's WER where a
template-held-out one showed 0.97 x).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from asrops.audio import decode_audio
from asrops.audio_format import SAMPLE_RATE
from asrops.clip_manifest import write_rows
from asrops.errors import AudioError
from asrops.evaluation import MISSING, load_manifest
from asrops.features import audio_features
from asrops.feedback import FeedbackStore
from asrops.registry.store import ObjectStore
from asrops.settings import DatasetSettings
from asrops.textnorm import normalize_english

log = logging.getLogger(__name__)

Source = Literal["feedback", "curated", "acoustic", "replay", "self_labelled", "retention", "golden"]
DRIFT_SOURCES = ("feedback", "curated", "acoustic")
"""Training rows of the new data: the drift a retrain is for."""
REPLAYED_SOURCES = ("replay", "self_labelled")
"""Training rows of known-good speech the parent already serves well."""
SplitName = Literal["train", "validation", "test"]
DropReason = Literal[
    "empty_transcript", "undecodable", "duration_out_of_bounds", "silent", "clipping", "low_snr",
    "implausible_chars_per_s", "duplicate_audio", "duplicate_transcript", "contamination",
]  # fmt: skip
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)
REASON_DOC: dict[DropReason, str] = {
    "empty_transcript": "transcript empty after normalisation",
    "undecodable": "audio missing or not decodable",
    "duration_out_of_bounds": "duration outside [min_duration_s, max_duration_s]",
    "silent": "share of non-silent frames below min_speech_ratio",
    "clipping": "share of clipped samples above max_clipping_ratio",
    "low_snr": "estimated SNR below min_snr_db",
    "implausible_chars_per_s": "transcript characters per second outside [min, max]: "
    "the text does not belong to the audio",
    "duplicate_audio": "same decoded audio as an earlier clip (the first is kept)",
    "duplicate_transcript": "same normalised text and slices as an earlier clip of the same "
    "source (the first is kept)",
    "contamination": "audio, group or sentence also in an evaluation set "
    "(validation, test or golden); dropped from training",
}
EXAMPLE_IDS = 5  # ids kept per drop reason, for the report
PROGRESS_EVERY = 50  # clips between progress lines
SPLIT_ORDER: tuple[SplitName, ...] = ("train", "test", "validation")
"""Order in which equal costs are broken when a group is assigned."""


class Example(BaseModel):
    """One labelled clip."""

    id: str
    audio: str
    """Absolute local path to the clip (any format `decode_audio` reads; 16 kHz mono kept)."""
    text: str
    source: Source
    slices: dict[str, str] = {}
    """Values of `DatasetSettings.slice_fields` the source row (or feedback tags) had, as strings."""
    duration_s: float | None = None
    audio_sha256: str | None = None
    """sha256 of the decoded 16 kHz float32 samples (so a WAV and its FLAC copy match)."""
    group: str | None = None
    """What must not be split across train and held-out: the synthetic `template`, else the
    normalised text."""
    origin: str | None = None
    """The manifest it came from (its folder's name for a `manifest.jsonl`), for reports by part."""

    def stratum(self, fields: Iterable[str]) -> tuple[str, ...]:
        return tuple(self.slices.get(f, MISSING) for f in fields)


class DropCounts(BaseModel):
    """Clips left out, per reason (and per source), with up to `EXAMPLE_IDS` ids per reason."""

    counts: dict[DropReason, int] = Field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    examples: dict[DropReason, list[str]] = Field(default_factory=dict)
    by_source: dict[str, dict[DropReason, int]] = Field(default_factory=dict)

    def add(self, reason: DropReason, example: Example) -> None:
        self.counts[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < EXAMPLE_IDS:
            ids.append(example.id)
        source = self.by_source.setdefault(example.source, dict.fromkeys(DROP_REASONS, 0))
        source[reason] += 1

    def merge(self, other: DropCounts) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            ids = self.examples.setdefault(reason, [])
            ids += other.examples.get(reason, [])[: EXAMPLE_IDS - len(ids)]
        for source, counts in other.by_source.items():
            mine = self.by_source.setdefault(source, dict.fromkeys(DROP_REASONS, 0))
            for reason, n in counts.items():
                mine[reason] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Splits(BaseModel):
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def items(self) -> list[tuple[SplitName, list[Example]]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


class SplitSummary(BaseModel):
    n: int
    audio_s: float
    groups: int
    by_source: dict[str, int]
    by_slice: dict[str, dict[str, int]]
    """Slice field -> value -> examples."""


class ReplaySummary(BaseModel):
    requested: int
    """replay_share x new training examples."""
    drawn: int
    pool: int
    """Usable replay examples (validated, not contaminated)."""
    retention: int = 0
    """Examples set aside (never trained on) for the forgetting guard, which checks that the
    parent's knowledge survives: `retention_clips` of the pool plus the retention-only manifests."""
    note: str | None = None


class DataReport(BaseModel):
    created_at: datetime
    settings: DatasetSettings
    counts_in: dict[str, int]
    """Examples received per source (golden: the evaluation set checked against)."""
    drops: DropCounts
    """Every drop, with counts per source."""
    splits: dict[SplitName, SplitSummary]
    replay: ReplaySummary
    contamination: int
    notes: list[str] = []


class BuiltDataset(BaseModel):
    train: Path
    validation: Path
    test: Path
    retention: Path
    """What the parent already transcribes well (the forgetting guard keeps weights that keep it)."""
    report_json: Path
    report_md: Path
    report: DataReport


# --- loaders -----------------------------------------------------------------------------
def _slices(values: dict, fields: Iterable[str]) -> dict[str, str]:
    return {f: str(values[f]) for f in fields if values.get(f) is not None}


def normalised(text: str) -> str:
    return " ".join(normalize_english(text).split())


def examples_from_manifest(
    path: Path, source: Source, slice_fields: list[str] | None = None,
    hold_out_by: Literal["template", "sentence"] = "template",
) -> list[Example]:
    """Rows of a manifest (`asrops synth`'s format: `audio` relative to it or absolute, `text`,
    slice fields) as examples; the id is the row's `id`/`utt_id`, else the audio file's stem;
    the group is the row's `group` or `template` (with `hold_out_by="template"`), else its
    normalised text."""
    fields = DatasetSettings().slice_fields if slice_fields is None else slice_fields
    path = Path(path)
    origin = path.parent.name if path.name == "manifest.jsonl" else path.stem
    examples = []
    for item in load_manifest(path):
        extra = item.model_extra or {}
        group = (extra.get("group") or extra.get("template")) if hold_out_by == "template" else None
        duration = extra.get("duration_s")
        examples.append(
            Example(
                id=str(extra.get("id") or extra.get("utt_id") or Path(item.audio).stem),
                audio=item.audio,
                text=item.text,
                source=source,
                slices=_slices(extra, fields),
                duration_s=float(duration) if isinstance(duration, (int, float)) else None,
                group=str(group) if group else normalised(item.text),
                origin=origin,
            )
        )
    return examples


def _safe_name(request_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", request_id)[:120] or "request"


def cap_per_client(frame: pd.DataFrame, share: float) -> pd.DataFrame:
    """At most `share` of the corrections from any one client, its newest kept, when there are
    several clients (with one, there is no one else to be fair to; the retrain trigger's
    `min_label_clients` decides whether its corrections start a retrain at all)."""
    if not len(frame):
        return frame
    who = frame["client"].fillna("unknown")
    if who.nunique() < 2:
        return frame
    cap = max(1, math.floor(share * len(frame)))
    newest_first = frame.assign(_who=who).sort_values("received_at", ascending=False)
    kept = newest_first.groupby("_who", sort=False).head(cap)
    if dropped := len(frame) - len(kept):
        counts = who.value_counts()
        log.info("feedback: %d corrections left out, no client gives more than %d of %d (%.0f %%); by client: %s",
                 dropped, cap, len(frame), 100 * share, dict(counts[counts > cap]))
    return kept.drop(columns="_who").sort_values("received_at")


def examples_from_feedback(
    store: ObjectStore,
    start: datetime,
    end: datetime,
    out_dir: Path,
    slice_fields: list[str] | None = None,
    max_client_share: float | None = None,
) -> list[Example]:
    """Corrections received in [start, end) that kept their audio: each FLAC is copied from the
    store to `out_dir/audio/<request id>.flac`; slices come from the correction's tags. A
    correction whose audio is gone is still returned (`validate` counts it as undecodable).
    With several clients, none gives more than `max_client_share` of them (`cap_per_client`)."""
    defaults = DatasetSettings()
    fields = defaults.slice_fields if slice_fields is None else slice_fields
    share = defaults.max_client_share if max_client_share is None else max_client_share
    frame = cap_per_client(FeedbackStore(store).read(start, end), share)
    audio_dir = Path(out_dir) / "audio"
    examples, without_audio = [], 0
    for i, row in enumerate(frame.itertuples(index=False), 1):
        if not isinstance(row.audio_key, str) or not row.audio_key:
            without_audio += 1
            continue
        local = (audio_dir / f"{_safe_name(row.request_id)}.flac").resolve()
        try:
            store.download_file(row.audio_key, local)
        except KeyError:
            log.warning("feedback %s: audio %s is gone from the store", row.request_id, row.audio_key)
        tags = row.tags if isinstance(row.tags, dict) else {}
        examples.append(
            Example(
                id=str(row.request_id),
                audio=str(local),
                text=str(row.reference),
                source="feedback",
                slices=_slices(tags, fields),
                group=normalised(str(row.reference)),
            )
        )
        if i % PROGRESS_EVERY == 0:
            log.info("feedback: fetched %d/%d clips", i, len(frame))
    if without_audio:
        log.info("feedback: %d corrections had no kept audio and were skipped", without_audio)
    return examples


# --- validation --------------------------------------------------------------------------
def _sha256(samples: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(samples, dtype="<f4").tobytes()).hexdigest()


def _quality_reason(
    example: Example, samples: np.ndarray, settings: DatasetSettings
) -> DropReason | None:
    f = audio_features(samples, SAMPLE_RATE, 1)
    if not settings.min_duration_s <= f.duration_s <= settings.max_duration_s:
        return "duration_out_of_bounds"
    if 1.0 - f.silence_ratio < settings.min_speech_ratio:
        return "silent"
    if f.clipping_ratio > settings.max_clipping_ratio:
        return "clipping"
    if f.snr_db < settings.min_snr_db:
        return "low_snr"
    chars_per_s = len(example.text.strip()) / f.duration_s
    if not settings.min_chars_per_s <= chars_per_s <= settings.max_chars_per_s:
        return "implausible_chars_per_s"
    return None


def validate(
    examples: list[Example], settings: DatasetSettings
) -> tuple[list[Example], DropCounts]:
    """Decode each clip once and keep those fit to train on; the kept examples come back with
    `duration_s` and `audio_sha256` filled in. Checks run in the order of `DROP_REASONS`, and a
    clip is counted under the first it fails; of duplicates the first kept one stays."""
    drops = DropCounts()
    kept: list[Example] = []
    seen_audio: set[str] = set()
    seen_text: set[tuple] = set()
    fields = settings.slice_fields
    for i, example in enumerate(examples, 1):
        if i % PROGRESS_EVERY == 0:
            log.info("validating: %d/%d clips, %d kept", i, len(examples), len(kept))
        text = normalised(example.text)
        if not text:
            drops.add("empty_transcript", example)
            continue
        try:
            samples = decode_audio(example.audio).samples
        except (AudioError, FileNotFoundError, IsADirectoryError) as exc:
            log.info("%s: undecodable: %s", example.id, exc)
            drops.add("undecodable", example)
            continue
        reason = _quality_reason(example, samples, settings)
        sha = _sha256(samples)
        text_key = (example.source, text, example.stratum(fields))
        if reason is None and sha in seen_audio:
            reason = "duplicate_audio"
        if reason is None and text_key in seen_text:
            reason = "duplicate_transcript"
        if reason is not None:
            drops.add(reason, example)
            continue
        seen_audio.add(sha)
        seen_text.add(text_key)
        kept.append(example.model_copy(update={"duration_s": len(samples) / SAMPLE_RATE, "audio_sha256": sha}))
    log.info("validated %d clips: %d kept, %d dropped", len(examples), len(kept), drops.total)
    return kept, drops


def fingerprint(examples: list[Example]) -> list[Example]:
    """Fill in `audio_sha256` (and `duration_s`) where missing, e.g. for the golden set, which is
    checked against but not validated. Clips that cannot be decoded keep None."""
    out = []
    for i, example in enumerate(examples, 1):
        if i % PROGRESS_EVERY == 0:
            log.info("fingerprinting: %d/%d clips", i, len(examples))
        if example.audio_sha256 is None:
            try:
                samples = decode_audio(example.audio).samples
            except (AudioError, FileNotFoundError, IsADirectoryError) as exc:
                log.warning("%s: cannot fingerprint: %s", example.id, exc)
            else:
                example = example.model_copy(
                    update={"audio_sha256": _sha256(samples), "duration_s": len(samples) / SAMPLE_RATE})
        out.append(example)
    return out


# --- splitting ---------------------------------------------------------------------------
def _group_of(example: Example) -> str:
    return example.group or normalised(example.text)


def split(examples: list[Example], settings: DatasetSettings) -> Splits:
    """Stratified, grouped split into train / validation / test.

    Groups go whole to one split: largest first (equal sizes in a seeded random order), each to
    the split where it least increases the squared distance, per stratum, between the split's
    examples and its target share (`validation_share`, `test_share`, the rest train), relative to
    the target. A lone example of a tiny stratum thus trains rather than being held out.
    """
    fields = settings.slice_fields
    shares = {
        "train": 1.0 - settings.validation_share - settings.test_share,
        "validation": settings.validation_share,
        "test": settings.test_share,
    }
    if shares["train"] <= 0:
        raise ValueError("validation_share + test_share must leave a share for training")
    groups: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        groups[_group_of(example)].append(example)
    stratum_n = Counter(e.stratum(fields) for e in examples)
    fill: dict[str, Counter] = {name: Counter() for name in SPLIT_ORDER}
    assigned: dict[str, list[Example]] = {name: [] for name in SPLIT_ORDER}

    rng = np.random.default_rng(settings.seed)
    names = sorted(groups)
    order = [names[i] for i in rng.permutation(len(names))]
    order.sort(key=lambda g: -len(groups[g]))  # stable: random among equal sizes

    def cost(name: str, counts: Counter) -> float:
        """Growth of sum((fill - target)^2 / target) over the group's strata if it went to `name`."""
        total = 0.0
        for s, c in counts.items():
            target = shares[name] * stratum_n[s]
            total += c * (2 * (fill[name][s] - target) + c) / target
        return total

    for g in order:
        counts = Counter(e.stratum(fields) for e in groups[g])
        best = min(SPLIT_ORDER, key=lambda name: cost(name, counts))  # equals: the first wins
        fill[best].update(counts)
        assigned[best] += groups[g]
    return Splits(**assigned)


def _eval_keys(examples: Iterable[Example]) -> set[str]:
    keys = set()
    for e in examples:
        keys |= {f"group:{_group_of(e)}", f"text:{normalised(e.text)}"}
        if e.audio_sha256:
            keys.add(f"audio:{e.audio_sha256}")
    return keys


def _is_contaminated(example: Example, keys: set[str]) -> bool:
    return bool(_eval_keys([example]) & keys)


def remove_contamination(
    train: list[Example], evaluation: Iterable[Example], drops: DropCounts
) -> list[Example]:
    """Training examples whose audio, group or normalised sentence is in an evaluation set are
    dropped (and counted as `contamination`): a model must not be scored on what it trained on."""
    keys = _eval_keys(evaluation)
    kept = []
    for example in train:
        if _is_contaminated(example, keys):
            drops.add("contamination", example)
        else:
            kept.append(example)
    return kept


def draw_stratified(
    pool: list[Example], n: int, fields: list[str], seed: int
) -> list[Example]:
    """n examples of `pool`, each stratum in proportion to its size (largest remainders)."""
    if n >= len(pool):
        return list(pool)
    if n <= 0:
        return []
    by_stratum: dict[tuple, list[Example]] = defaultdict(list)
    for e in pool:
        by_stratum[e.stratum(fields)].append(e)
    strata = sorted(by_stratum)
    quotas = {s: n * len(by_stratum[s]) / len(pool) for s in strata}
    take = {s: math.floor(q) for s, q in quotas.items()}
    for s in sorted(strata, key=lambda s: take[s] - quotas[s])[: n - sum(take.values())]:
        take[s] += 1
    rng = np.random.default_rng(seed)
    drawn = []
    for s in strata:
        members = by_stratum[s]
        drawn += [members[i] for i in sorted(rng.permutation(len(members))[: take[s]])]
    return drawn


# --- building ----------------------------------------------------------------------------
def _summary(examples: list[Example], fields: list[str]) -> SplitSummary:
    by_slice = {
        f: dict(sorted(Counter(e.slices.get(f, MISSING) for e in examples).items())) for f in fields
    }
    return SplitSummary(
        n=len(examples),
        audio_s=round(sum(e.duration_s or 0.0 for e in examples), 3),
        groups=len({_group_of(e) for e in examples}),
        by_source=dict(Counter(e.source for e in examples)),
        by_slice=by_slice,
    )


def _manifest_row(example: Example) -> dict:
    return {
        "id": example.id,
        "audio": str(Path(example.audio).resolve()),
        "text": example.text,
        "source": example.source,
        "origin": example.origin,
        **example.slices,
        "group": _group_of(example),
        "duration_s": example.duration_s,
    }


def _write_manifest(path: Path, examples: list[Example]) -> None:
    write_rows(path, (_manifest_row(e) for e in examples))


def build_dataset(
    new: list[Example],
    golden: list[Example],
    replay: list[Example],
    settings: DatasetSettings,
    out_dir: Path,
    retention: list[Example] = (),
    acoustic: list[Example] = (),
) -> BuiltDataset:
    """Validate the new data, drop what the golden set already holds, split it, add the validated
    `acoustic` examples (the drift's acoustics over broad text) to training only, then add replayed
    examples (`replay_share` x the new training examples, drawn stratified from `replay` only:
    golden clips are evaluated on, never trained on). A retention set is kept apart first:
    `retention_clips` of the replay pool (at most half of it) plus the validated `retention`
    examples. Writes `train.jsonl`, `validation.jsonl`, `test.jsonl`, `retention.jsonl`,
    `report.json` and `report.md` under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = settings.slice_fields
    counts_in = dict(Counter(e.source for e in [*new, *acoustic, *replay, *retention, *golden]))
    notes: list[str] = []

    kept, drops = validate(new, settings)
    golden = fingerprint(golden)
    # A golden clip (or sentence) in the new data would be trained on, or scored twice.
    fresh = remove_contamination(kept, golden, drops)
    splits = split(fresh, settings)
    held_out = [*splits.validation, *splits.test, *golden]
    train = remove_contamination(splits.train, held_out, drops)  # groups are disjoint already
    acoustic_kept, acoustic_drops = validate(list(acoustic), settings)
    drops.merge(acoustic_drops)
    train += remove_contamination(acoustic_kept, held_out, drops)

    replay_kept, replay_drops = validate(replay, settings)
    drops.merge(replay_drops)
    pool = remove_contamination(replay_kept, held_out, drops)
    # Self-labelled clips carry the parent's own output: judging the parent on them means nothing.
    labelled = [e for e in pool if e.source == "replay"]
    kept_apart = draw_stratified(labelled, min(settings.retention_clips, len(labelled) // 2), fields, settings.seed)
    apart_ids = {e.id for e in kept_apart}
    retention_kept, retention_drops = validate(list(retention), settings)
    drops.merge(retention_drops)
    retention_set = kept_apart + remove_contamination(retention_kept, [*held_out, *train], drops)
    pool_left = [e for e in pool if e.id not in apart_ids]
    requested = round(settings.replay_share * len(train))
    drawn = draw_stratified(pool_left, requested, fields, settings.seed)
    replay_summary = ReplaySummary(requested=requested, drawn=len(drawn), pool=len(pool),
                                   retention=len(retention_set))
    if not replay:
        replay_summary.note = "no replay examples given: training has new data only (risk of forgetting)"
    elif len(drawn) < requested:
        replay_summary.note = f"replay pool holds only {len(pool)} usable examples of {requested} wanted"
    if replay_summary.note:
        notes.append(replay_summary.note)
        log.warning("%s", replay_summary.note)
    train = train + drawn
    if not splits.test or not splits.validation:
        notes.append("a held-out split is empty: too few groups to hold out")

    final = Splits(train=train, validation=splits.validation, test=splits.test)
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "validation", "test", "retention")}
    for name, examples in [*final.items(), ("retention", retention_set)]:
        _write_manifest(paths[name], examples)
    report = DataReport(
        created_at=datetime.now().astimezone(),
        settings=settings,
        counts_in=counts_in,
        drops=drops,
        splits={name: _summary(examples, fields) for name, examples in final.items()},
        replay=replay_summary,
        contamination=drops.counts["contamination"],
        notes=notes,
    )
    report_json, report_md = out_dir / "report.json", out_dir / "report.md"
    report_json.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    report_md.write_text(format_report(report), encoding="utf-8")
    log.info(
        "dataset in %s: train %d (replay %d), validation %d, test %d; %d dropped",
        out_dir, len(train), len(drawn), len(final.validation), len(final.test), drops.total,
    )
    return BuiltDataset(
        train=paths["train"], validation=paths["validation"], test=paths["test"], retention=paths["retention"],
        report_json=report_json, report_md=report_md, report=report,
    )


# --- report ------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def format_report(report: DataReport) -> str:
    """The data report as Markdown: inputs, drops per reason (every reason, with example ids),
    split sizes overall and per slice value, replay and contamination."""
    s, splits = report.settings, report.splits
    lines = [
        "# Retraining data report",
        "",
        (
            f"Built {report.created_at:%Y-%m-%d %H:%M %Z}. Kept: SNR >= {s.min_snr_db:g} dB, "
            f"clipping <= {s.max_clipping_ratio:g}, {s.min_duration_s:g}-{s.max_duration_s:g} s, "
            f"{s.min_chars_per_s:g}-{s.max_chars_per_s:g} characters/s, speech >= "
            f"{s.min_speech_ratio:g} of frames; held out {s.validation_share:g} validation and "
            f"{s.test_share:g} test per slice."
        ),
        "",
        "## Inputs",
        "",
    ]
    rows = []
    for source, n in report.counts_in.items():
        dropped = sum(report.drops.by_source.get(source, {}).values())
        used = {name: splits[name].by_source.get(source, 0) for name in splits}
        rows.append([source, n, dropped, used["train"], used["validation"], used["test"]])
    lines += _table(["source", "in", "dropped", "train", "validation", "test"], rows)
    lines += ["", f"## Drops ({report.drops.total})", ""]
    lines += _table(
        ["reason", "count", "meaning", "examples"],
        [[r, report.drops.counts[r], REASON_DOC[r], ", ".join(report.drops.examples.get(r, [])) or "-"]
         for r in DROP_REASONS],
    )
    lines += ["", "## Splits", ""]
    lines += _table(
        ["split", "examples", "audio (min)", "groups", "by source"],
        [[name, x.n, f"{x.audio_s / 60:.1f}", x.groups,
          ", ".join(f"{k} {v}" for k, v in sorted(x.by_source.items())) or "-"]
         for name, x in splits.items()],
    )
    for field in s.slice_fields:
        values = sorted({v for x in splits.values() for v in x.by_slice.get(field, {})})
        lines += ["", f"### Slice `{field}`", ""]
        lines += _table(
            ["value", *splits], [[v, *(x.by_slice.get(field, {}).get(v, 0) for x in splits.values())]
                                 for v in values],
        )
    r = report.replay
    lines += [
        "", "## Replay", "",
        (
            f"{r.drawn} replayed examples in train (wanted {r.requested} = {s.replay_share:g} x "
            f"new training examples; usable pool {r.pool}). {r.retention} examples kept apart, "
            "never trained on, for the forgetting guard (what the parent knew must survive)."
        ),
    ]
    if r.note:
        lines.append(f"**{r.note}**")
    lines += [
        "", "## Contamination", "",
        (
            f"{report.contamination} examples dropped because their audio, group or sentence is "
            "also in an evaluation set (validation, test or golden)."
        ),
    ]
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"
