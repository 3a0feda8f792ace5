"""Word and character error rates over a manifest of (audio, reference) pairs, overall and per
slice (source, tier, subset, ...), so a model change can be judged where it matters.

Rates are corpus-level (total errors / total reference words), not a mean of per-utterance
rates, and both sides are normalised with Whisper's English normaliser first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jiwer
import numpy as np
from pydantic import BaseModel, ConfigDict

from asrops.audio import SAMPLE_RATE, decode_audio
from asrops.clip_manifest import numbered_rows, write_rows
from asrops.errors import AudioError
from asrops.textnorm import normalize_english

MAX_SLICE_VALUES = 20
NON_SLICE_FIELDS = frozenset(
    {
        "audio", "text", "raw_text", "text_punctuated", "utt_id", "notes", "repo", "repo_path",
        "commit", "transcript_commit", "segments", "duration_s", "peak_dbfs", "rms_dbfs",
        "license", "level_warning",
    }
)  # fmt: skip
MISSING = "(none)"
"""Slice value of an item that lacks the field (e.g. `subset` is set on few rows)."""


class EvalItem(BaseModel):
    """One manifest row; fields beyond `audio` and `text` are kept (they become slices)."""

    model_config = ConfigDict(extra="allow")

    audio: str
    """Absolute path once loaded by `load_manifest`."""
    text: str
    """Reference transcript, as written in the source (normalised only when scoring)."""


class ItemCounts(NamedTuple):
    """One utterance's reference sizes and error counts (normalised text), the unit that
    corpus rates sum and the evaluation gate's bootstrap resamples."""

    words: int
    word_errors: int
    """Substitutions + deletions + insertions."""
    chars: int
    char_errors: int


class Score(BaseModel):
    wer: float
    """Word error rate in percent; 0.0 when nothing was scored (`words == 0`)."""
    cer: float
    """Character error rate in percent (spaces count as characters)."""
    words: int
    word_errors: int
    """Substitutions + deletions + insertions."""
    chars: int
    char_errors: int
    n: int
    """Utterances scored."""
    skipped: int = 0
    """Utterances whose normalised reference is empty (e.g. only fillers); not scored."""


class ItemResult(BaseModel):
    audio: str
    reference: str
    hypothesis: str
    wer: float | None
    """Percent; None when the normalised reference is empty."""
    duration_s: float
    slices: dict[str, str]
    counts: ItemCounts | None = None
    """Word and character counts behind `wer`; None when the normalised reference is empty."""


class EvalReport(BaseModel):
    overall: Score
    slices: dict[str, dict[str, Score]]
    """Slice field -> value -> score."""
    n: int
    audio_s: float
    wall_s: float
    """Seconds spent inside `transcribe` (audio decoding and scoring excluded)."""
    rtfx: float
    """Audio seconds per transcription second (higher is faster)."""
    version: str | None = None
    engine: str | None = None
    items: list[ItemResult]


# --- manifest ----------------------------------------------------------------------------
def load_manifest(
    path: Path, *, filter: Callable[[EvalItem], bool] | None = None
) -> list[EvalItem]:
    """Read a clip manifest (asrops/clip_manifest.py); relative `audio` paths are resolved against
    the manifest's folder."""
    items = []
    for line_no, row in numbered_rows(path, resolve_audio=True):
        try:
            item = EvalItem.model_validate(row)
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: not a valid manifest row: {exc}") from exc
        if filter is None or filter(item):
            items.append(item)
    return items


def _field(item: EvalItem | dict, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def core_english_filter(item: EvalItem | dict) -> bool:
    """The speech data README's "core" English subset: gold references, 1-30 s, no speech styles."""
    duration = _field(item, "duration_s")
    return (
        _field(item, "lang") == "en"
        and _field(item, "tier") == "gold"
        and _field(item, "subset") != "speech-styles"
        and duration is not None
        and 1 <= duration <= 30
    )


def core_english_clips(speech_manifest: Path, skip: int, n: int, out: Path) -> Path:
    """A manifest of `n` core English clips after the first `skip` (golden sets take the first
    ones; retention and replay sets the next, so that no clip is in two of them)."""
    items = load_manifest(speech_manifest, filter=core_english_filter)[skip : skip + n]
    return write_rows(out, ({"audio": item.audio, "text": item.text} for item in items))


# --- scoring -----------------------------------------------------------------------------
def _counts(reference: str, hypothesis: str) -> ItemCounts:
    """(words, word errors, chars, char errors) for normalised, non-empty `reference`."""
    w = jiwer.process_words(reference, hypothesis)
    c = jiwer.process_characters(reference, hypothesis)
    words = w.hits + w.substitutions + w.deletions
    chars = c.hits + c.substitutions + c.deletions
    return ItemCounts(
        words,
        w.substitutions + w.deletions + w.insertions,
        chars,
        c.substitutions + c.deletions + c.insertions,
    )


def score_counts(counts: Iterable[ItemCounts | None]) -> Score:
    """Corpus-level rates from per-utterance counts; None (an empty reference) counts as skipped."""
    words = word_errors = chars = char_errors = n = skipped = 0
    for c in counts:
        if c is None:
            skipped += 1
            continue
        n += 1
        words, word_errors = words + c[0], word_errors + c[1]
        chars, char_errors = chars + c[2], char_errors + c[3]
    return Score(
        wer=100.0 * word_errors / words if words else 0.0,
        cer=100.0 * char_errors / chars if chars else 0.0,
        words=words,
        word_errors=word_errors,
        chars=chars,
        char_errors=char_errors,
        n=n,
        skipped=skipped,
    )


def item_counts(reference: str, hypothesis: str) -> ItemCounts | None:
    """One utterance's counts after Whisper normalisation; None when the reference normalises to ""."""
    ref, hyp = normalize_english(reference), normalize_english(hypothesis)
    return _counts(ref, hyp) if ref else None


def score(references: list[str], hypotheses: list[str]) -> Score:
    """Corpus-level WER/CER (percent) after Whisper normalisation of both sides."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return score_counts(item_counts(r, h) for r, h in zip(references, hypotheses))


# --- evaluation --------------------------------------------------------------------------
def default_slice_fields(items: list[EvalItem]) -> list[str]:
    """Extra fields whose values are all str/bool/int (or absent) with 2..20 distinct values."""
    names = {n for item in items for n in (item.model_extra or {}) if n not in NON_SLICE_FIELDS}
    fields = []
    for name in sorted(names):
        values = [_field(item, name) for item in items]
        scalar = all(v is None or isinstance(v, (str, bool, int)) for v in values)
        if scalar and 2 <= len(set(values)) <= MAX_SLICE_VALUES:
            fields.append(name)
    return fields


def _decode(item: EvalItem) -> np.ndarray:
    try:
        return decode_audio(item.audio).samples
    except AudioError as exc:  # name the file: a manifest has hundreds
        raise type(exc)(f"{item.audio}: {exc}") from exc


def _slice_value(item: EvalItem, name: str) -> str:
    value = _field(item, name)
    return MISSING if value is None else str(value)


def evaluate(
    transcribe: Callable[[list[np.ndarray]], list[str]],
    items: list[EvalItem],
    *,
    slice_fields: list[str] | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    version: str | None = None,
    engine: str | None = None,
) -> EvalReport:
    """Decode each item's audio (no limits), transcribe in batches, and score overall and per slice.

    `transcribe` takes a batch of 16 kHz mono float32 arrays and returns one text per array;
    `progress(done, total)` is called after each batch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    fields = default_slice_fields(items) if slice_fields is None else list(slice_fields)
    results: list[ItemResult] = []
    counts: list[ItemCounts | None] = []
    audio_s = wall_s = 0.0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        audios = [_decode(item) for item in batch]
        t0 = time.perf_counter()
        hypotheses = list(transcribe(audios))
        wall_s += time.perf_counter() - t0
        if len(hypotheses) != len(batch):
            raise ValueError(f"transcribe returned {len(hypotheses)} texts for {len(batch)} inputs")
        for item, samples, hyp in zip(batch, audios, hypotheses):
            c = item_counts(item.text, hyp)
            counts.append(c)
            duration = samples.size / SAMPLE_RATE
            audio_s += duration
            results.append(
                ItemResult(
                    audio=item.audio,
                    reference=item.text,
                    hypothesis=hyp,
                    wer=100.0 * c[1] / c[0] if c else None,
                    duration_s=duration,
                    slices={f: _slice_value(item, f) for f in fields},
                    counts=c,
                )
            )
        if progress is not None:
            progress(len(results), len(items))

    slices: dict[str, dict[str, Score]] = {}
    for f in fields:
        groups: dict[str, list] = {}
        for r, c in zip(results, counts):
            groups.setdefault(r.slices[f], []).append(c)
        slices[f] = {value: score_counts(groups[value]) for value in sorted(groups)}
    return EvalReport(
        overall=score_counts(counts),
        slices=slices,
        n=len(results),
        audio_s=audio_s,
        wall_s=wall_s,
        rtfx=audio_s / wall_s if wall_s > 0 else 0.0,
        version=version,
        engine=engine,
        items=results,
    )


def format_report(report: EvalReport) -> str:
    """A plain-text table: overall first, then each slice field's values."""
    header = f"{'slice':<24} {'value':<36} {'n':>5} {'WER %':>7} {'CER %':>7}"
    lines = []
    if report.engine or report.version:
        lines.append(f"engine: {report.engine or '-'}  version: {report.version or '-'}")
    lines.append(
        f"{report.n} utterances, {report.audio_s / 60:.1f} min audio, "
        f"{report.wall_s:.1f} s transcribing (RTFx {report.rtfx:.1f})"
    )
    lines += [header, "-" * len(header)]

    def row(field: str, value: str, s: Score) -> str:
        return f"{field:<24} {value[:36]:<36} {s.n:>5} {s.wer:>7.2f} {s.cer:>7.2f}"

    lines.append(row("overall", "", report.overall))
    for field, by_value in report.slices.items():
        for value, s in by_value.items():
            lines.append(row(field, value, s))
    if report.overall.skipped:
        skipped = report.overall.skipped
        lines.append(f"({skipped} utterances with an empty normalised reference not scored)")
    return "\n".join(lines)
