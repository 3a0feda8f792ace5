"""The evaluation gate: a candidate version is compared with the stable one on the held-out
split of the new data, on generalisation sets (the drift over sentences no training text has)
and on each part of the pinned golden set, and is published only if it is better where it was
trained to be, carries that to sentences it never saw, is no worse where it was not trained,
and does not run away (insert or loop) where the stable did not.

Differences are judged with a paired bootstrap over items (both systems scored on the same
resample), so "better" means the whole confidence interval of the WER difference is below
zero, not a lucky point estimate. Rates are corpus-level and Whisper-normalised, exactly as
`asrops.evaluation` computes them; numbers and proper nouns get their own recall, because
those are what a domain fine-tune is for and what a WER average hides.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from asrops.engines import DecodeOptions, WhisperEngine
from asrops.evaluation import (
    EvalItem,
    ItemCounts,
    ItemResult,
    Score,
    evaluate,
    item_counts,
    load_manifest,
    score_counts,
)
from asrops.settings import GateSettings
from asrops.textnorm import normalize_english

log = logging.getLogger(__name__)

MIN_SLICE_ITEMS_FOR_INTERVAL = 20
"""Slices with fewer scored items get no bootstrap interval: it would say little."""
_MAX_RESAMPLED_CELLS = 2_000_000
"""Resampled indices held at once (resamples x items), to bound the bootstrap's memory (16 MB)."""


# --- transcription ----------------------------------------------------------------------------
def transcribe_manifest(
    engine: WhisperEngine,
    manifest_path: Path,
    progress: Callable[[int, int], None] | None = None,
    *,
    batch_size: int,
    slice_fields: list[str] | None = None,
    filter: Callable[[EvalItem], bool] | None = None,
    options: DecodeOptions | None = None,
) -> list[ItemResult]:
    """Transcribe every clip of a JSONL manifest (`batch_size` clips per engine call) and score
    each against its reference. `slice_fields` None means every field that looks like a slice
    (see `asrops.evaluation.default_slice_fields`); named fields no row has are dropped.
    `progress(done, total)` is called after each batch; without it progress is logged."""
    manifest_path = Path(manifest_path)
    items = load_manifest(manifest_path, filter=filter)
    if slice_fields is not None:
        present = {name for item in items for name in (item.model_extra or {})}
        slice_fields = [name for name in slice_fields if name in present]

    def transcribe(audios: list[np.ndarray]) -> list[str]:
        return [t.text for t in engine.transcribe(audios, options)]

    report = evaluate(
        transcribe,
        items,
        slice_fields=slice_fields,
        batch_size=batch_size,
        progress=progress or _progress_logger(manifest_path.name),
        engine=getattr(engine, "name", None),
    )
    log.info("%s: %d clips, WER %.2f %%, RTFx %.1f", manifest_path.name, report.n, report.overall.wer, report.rtfx)
    return report.items


def _progress_logger(name: str) -> Callable[[int, int], None]:
    """Log at every tenth of the way (and at the end), not after every batch."""
    logged = [-1]

    def progress(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > logged[0] or done == total:
            logged[0] = tenth
            log.info("%s: transcribed %d/%d clips", name, done, total)

    return progress


# --- paired bootstrap -------------------------------------------------------------------------
class Interval(BaseModel):
    """A difference candidate - stable in percentage points, with its bootstrap interval."""

    diff: float
    """On all items (not a resample mean)."""
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.high < 0 or self.low > 0


def paired_bootstrap(
    candidate: Sequence[ItemCounts | None],
    stable: Sequence[ItemCounts | None],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of corpus WER(candidate) - WER(stable), in points, resampling items
    with replacement; each resample is applied to both systems (paired), so per-item difficulty
    cancels out. Items at the same index must share a reference; None entries (empty normalised
    reference) are left out."""
    if len(candidate) != len(stable):
        raise ValueError(f"{len(candidate)} candidate items but {len(stable)} stable items")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    pairs = [(i, c, s) for i, (c, s) in enumerate(zip(candidate, stable)) if c is not None and s is not None]
    if not pairs:
        raise ValueError("no scored items to resample")
    for i, c, s in pairs:
        if c.words != s.words:
            raise ValueError(f"item {i}: {c.words} reference words for the candidate, {s.words} for the stable")
    words = np.array([c.words for _, c, _ in pairs], dtype=np.float64)
    delta = np.array([c.word_errors - s.word_errors for _, c, s in pairs], dtype=np.float64)
    n = len(pairs)
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    chunk = max(1, _MAX_RESAMPLED_CELLS // n)
    for start in range(0, samples, chunk):
        m = min(chunk, samples - start)
        idx = rng.integers(0, n, size=(m, n))
        w, d = words[idx].sum(axis=1), delta[idx].sum(axis=1)
        diffs[start : start + m] = 100.0 * np.divide(d, w, out=np.zeros(m), where=w > 0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Interval(diff=100.0 * delta.sum() / words.sum(), low=float(low), high=float(high))


# --- numbers and proper nouns -----------------------------------------------------------------
_EDGE_PUNCT = "\"'“”‘’()[]{}<>,.;:!?…-–—*_/"
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "mt", "ft", "e.g", "i.e"})
"""Words whose full stop does not end a sentence ("Mr. Smith": Smith is not sentence-initial)."""
_NOT_NAMES = frozenset({"i", "i'm", "i've", "i'll", "i'd", "mr", "mrs", "ms", "dr", "prof", "st", "sir", "madam"})
"""Capitalised mid-sentence but not names themselves (the pronoun, titles)."""
_OPENING_QUOTES = '"“‘'
_POSSESSIVE = re.compile(r"['’]s$", re.IGNORECASE)


def number_tokens(reference: str) -> list[str]:
    """Tokens of the normalised reference that contain a digit ("twenty-five dollars" -> "$25")."""
    return [t for t in normalize_english(reference).split() if any(ch.isdigit() for ch in t)]


def proper_noun_tokens(reference: str) -> list[str]:
    """Normalised tokens of the words capitalised in the raw reference that do not start a
    sentence: names and places ("Send it to Maria in Lisbon." -> ["maria", "lisbon"])."""
    tokens: list[str] = []
    initial = True
    for raw in reference.split():
        word = raw.strip(_EDGE_PUNCT)
        if not any(ch.isalnum() for ch in word):
            initial = initial or bool(_SENTENCE_END.search(raw))
            continue
        bare = _POSSESSIVE.sub("", word)
        initial = initial or raw[0] in _OPENING_QUOTES  # a quotation starts with a capital too
        if not initial and bare[0].isupper() and bare.lower().replace("’", "'") not in _NOT_NAMES:
            tokens += normalize_english(bare).split()
        initial = bool(_SENTENCE_END.search(raw)) and word.lower() not in _ABBREVIATIONS and not _is_initial(word)
    return tokens


def _is_initial(word: str) -> bool:
    """A single capital like the "J" of "J. Smith"."""
    return len(word) == 1 and word.isupper()


class TermCounts(BaseModel):
    """Reference numbers and proper nouns of one or more utterances, and how many the
    hypotheses contain (bag of words: each occurrence is matched at most once)."""

    numbers: int = 0
    numbers_found: int = 0
    proper_nouns: int = 0
    proper_nouns_found: int = 0

    def __add__(self, other: TermCounts) -> TermCounts:
        return TermCounts(**{k: getattr(self, k) + getattr(other, k) for k in TermCounts.model_fields})


def _found(terms: list[str], hypothesis: Counter[str]) -> int:
    return sum((Counter(terms) & hypothesis).values())


def term_counts(reference: str, hypothesis: str) -> TermCounts:
    hyp = Counter(normalize_english(hypothesis).split())
    numbers, names = number_tokens(reference), proper_noun_tokens(reference)
    return TermCounts(
        numbers=len(numbers),
        numbers_found=_found(numbers, hyp),
        proper_nouns=len(names),
        proper_nouns_found=_found(names, hyp),
    )


class TermAccuracy(BaseModel):
    total: int
    found: int
    accuracy: float | None
    """Percent of `total` found; None when the references hold none."""

    @classmethod
    def of(cls, found: int, total: int) -> TermAccuracy:
        return cls(total=total, found=found, accuracy=100.0 * found / total if total else None)


class TermComparison(BaseModel):
    stable: TermAccuracy
    candidate: TermAccuracy


# --- comparison -------------------------------------------------------------------------------
RUNAWAY_WORD_RATIO = 1.5
RUNAWAY_EXTRA_WORDS = 3
"""A hypothesis runs away when it has more than 1.5 x the reference's words + 3 (normalised)..."""
LOOP_REPEATS = 3
LOOP_MAX_NGRAM = 4
"""...or says one phrase of 1-4 words 3 times in a row where the reference does not."""
RUNAWAY_EXAMPLES = 5


def _longest_loop(words: list[str]) -> int:
    """Most consecutive repeats of any 1..LOOP_MAX_NGRAM-word phrase in `words`."""
    best = 1
    for n in range(1, LOOP_MAX_NGRAM + 1):
        for start in range(len(words) - 2 * n + 1):
            repeats, at = 1, start + n
            while words[at : at + n] == words[start : start + n] and at + n <= len(words):
                repeats, at = repeats + 1, at + n
            best = max(best, repeats)
    return best


def runs_away(reference: str, hypothesis: str) -> bool:
    """Whisper's worst failures on a fine-tune: hallucinated words past the audio, or a loop."""
    ref, hyp = normalize_english(reference).split(), normalize_english(hypothesis).split()
    if len(hyp) > RUNAWAY_WORD_RATIO * len(ref) + RUNAWAY_EXTRA_WORDS:
        return True
    return _longest_loop(hyp) >= LOOP_REPEATS > _longest_loop(ref)


class RunawayComparison(BaseModel):
    """Items where each system runs away (`runs_away`), and where only the candidate does."""

    items: int
    stable: int
    candidate: int
    new: int
    """Items where the candidate runs away and the stable does not."""
    examples: list[str] = []
    """Audio of a few of the new ones."""


def compare_runaways(candidate: list[ItemResult], stable: list[ItemResult]) -> RunawayComparison:
    c = [runs_away(r.reference, r.hypothesis) for r in candidate]
    s = [runs_away(r.reference, r.hypothesis) for r in stable]
    new = [r.audio for r, ci, si in zip(candidate, c, s) if ci and not si]
    return RunawayComparison(items=len(c), stable=sum(s), candidate=sum(c), new=len(new),
                             examples=new[:RUNAWAY_EXAMPLES])


class Comparison(BaseModel):
    """Both systems on one set of items; differences are candidate - stable, in points."""

    n: int
    """Scored items (non-empty normalised reference)."""
    stable: Score
    candidate: Score
    wer_diff: float
    cer_diff: float
    interval: Interval | None = None
    """Bootstrap interval on `wer_diff`; None for slices under MIN_SLICE_ITEMS_FOR_INTERVAL items."""

    @property
    def wer_ratio(self) -> float:
        """Candidate WER / stable WER: 1 when both are 0, infinite when only the stable's is."""
        if self.stable.wer:
            return self.candidate.wer / self.stable.wer
        return 1.0 if self.candidate.wer == 0 else float("inf")


class SetComparison(BaseModel):
    name: str
    overall: Comparison
    slices: dict[str, dict[str, Comparison]]
    """Slice field -> value -> comparison."""
    numbers: TermComparison
    proper_nouns: TermComparison
    runaways: RunawayComparison | None = None
    """None in reports written before runaways were counted."""
    bootstrap_samples: int
    confidence: float
    seed: int


def _counts_of(result: ItemResult) -> ItemCounts | None:
    return result.counts if result.counts is not None else item_counts(result.reference, result.hypothesis)


def _check_paired(candidate: list[ItemResult], stable: list[ItemResult], set_name: str) -> None:
    if len(candidate) != len(stable):
        raise ValueError(f"{set_name}: {len(candidate)} candidate results but {len(stable)} stable results")
    for i, (c, s) in enumerate(zip(candidate, stable)):
        if c.audio != s.audio or c.reference != s.reference:
            raise ValueError(f"{set_name}: item {i} differs between systems ({c.audio!r} vs {s.audio!r})")


def compare(
    candidate_results: list[ItemResult],
    stable_results: list[ItemResult],
    settings: GateSettings,
    set_name: str,
    *,
    seed: int = 0,
) -> SetComparison:
    """WER/CER overall and per slice for both systems (slices from the candidate's results),
    the bootstrap interval on the WER difference overall and on slices of >= 20 scored items,
    and numbers / proper-noun recall. Both lists must hold the same items in the same order."""
    _check_paired(candidate_results, stable_results, set_name)
    cand = [_counts_of(r) for r in candidate_results]
    stab = [_counts_of(r) for r in stable_results]

    def comparison(indices: list[int], min_items: int) -> Comparison:
        c, s = [cand[i] for i in indices], [stab[i] for i in indices]
        c_score, s_score = score_counts(c), score_counts(s)
        interval = None
        if c_score.n >= max(min_items, 1):
            interval = paired_bootstrap(c, s, settings.bootstrap_samples, settings.confidence, seed)
        return Comparison(
            n=c_score.n,
            stable=s_score,
            candidate=c_score,
            wer_diff=c_score.wer - s_score.wer,
            cer_diff=c_score.cer - s_score.cer,
            interval=interval,
        )

    groups: dict[str, dict[str, list[int]]] = {}
    for i, result in enumerate(candidate_results):
        for field, value in result.slices.items():
            groups.setdefault(field, {}).setdefault(value, []).append(i)
    slices = {
        field: {value: comparison(by_value[value], MIN_SLICE_ITEMS_FOR_INTERVAL) for value in sorted(by_value)}
        for field, by_value in sorted(groups.items())
    }
    c_terms = sum((term_counts(r.reference, r.hypothesis) for r in candidate_results), TermCounts())
    s_terms = sum((term_counts(r.reference, r.hypothesis) for r in stable_results), TermCounts())
    return SetComparison(
        name=set_name,
        overall=comparison(list(range(len(cand))), 1),
        slices=slices,
        numbers=TermComparison(
            stable=TermAccuracy.of(s_terms.numbers_found, s_terms.numbers),
            candidate=TermAccuracy.of(c_terms.numbers_found, c_terms.numbers),
        ),
        proper_nouns=TermComparison(
            stable=TermAccuracy.of(s_terms.proper_nouns_found, s_terms.proper_nouns),
            candidate=TermAccuracy.of(c_terms.proper_nouns_found, c_terms.proper_nouns),
        ),
        runaways=compare_runaways(candidate_results, stable_results),
        bootstrap_samples=settings.bootstrap_samples,
        confidence=settings.confidence,
        seed=seed,
    )


# --- the gate ---------------------------------------------------------------------------------
class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]
    """One sentence per check, with its numbers; failed checks first."""


def _wer_change(c: SetComparison) -> str:
    o = c.overall
    text = f"WER {o.stable.wer:.2f} % -> {o.candidate.wer:.2f} % ({o.wer_diff:+.2f} points"
    if o.interval is not None:
        text += f", {c.confidence:.0%} interval [{o.interval.low:+.2f}, {o.interval.high:+.2f}]"
    return text + f", {o.n} items)"


def _heldout_check(heldout: SetComparison, settings: GateSettings) -> tuple[bool, str]:
    change = f"Held-out ({heldout.name}) {_wer_change(heldout)}"
    interval = heldout.overall.interval
    if not settings.require_heldout_improvement:
        return True, f"{change}: an improvement is not required (require_heldout_improvement is off)."
    if interval is None:
        return False, f"{change}: no scored items, so no improvement can be shown."
    if interval.high < 0:
        return True, f"{change}: the whole interval is below zero, an improvement."
    return False, f"{change}: the interval reaches {interval.high:+.2f}, so an improvement is not established."


def _golden_check(golden: SetComparison, settings: GateSettings) -> tuple[bool, str]:
    o, margin = golden.overall, settings.max_golden_relative_worsening
    limit = o.stable.wer * (1 + margin)
    change = f"Golden part {golden.name}: {_wer_change(golden)}"
    if o.n == 0:
        return False, f"{change}: no scored items, so holding it cannot be shown."
    relative = o.wer_diff / o.stable.wer if o.stable.wer else (0.0 if o.wer_diff <= 0 else float("inf"))
    held = o.candidate.wer <= limit + 1e-9
    verdict = "within" if held else "beyond"
    text = (
        f"{change}: {relative:+.1%} relative, {verdict} the allowed {margin:+.1%} (candidate WER at most {limit:.2f} %)"
    )
    allowed = limit - o.stable.wer
    if o.interval is not None:
        if o.interval.high <= allowed:
            text += f"; the interval's high end {o.interval.high:+.2f} is within the allowed {allowed:+.2f} points"
        else:
            text += (
                f"; the interval's high end {o.interval.high:+.2f} exceeds the allowed {allowed:+.2f} points, "
                "so holding it is not certain at this confidence"
            )
    return held, text + "."


def _generalisation_check(general: SetComparison, settings: GateSettings) -> tuple[bool, str]:
    o, most = general.overall, settings.max_generalisation_ratio
    change = f"Generalisation ({general.name}: the drift over sentences no training text has) {_wer_change(general)}"
    if o.n == 0:
        return False, f"{change}: no scored items, so generalising cannot be shown."
    ratio = o.wer_ratio
    if ratio <= most + 1e-9:
        return True, f"{change}: {ratio:.2f} x the stable's WER, within the required {most:.2f} x."
    return False, f"{change}: {ratio:.2f} x the stable's WER, above the required {most:.2f} x."


def _runaway_check(sets: Sequence[SetComparison], settings: GateSettings) -> tuple[bool, str]:
    counted = [c.runaways for c in sets if c.runaways is not None]
    items, new = sum(r.items for r in counted), sum(r.new for r in counted)
    allowed = int(settings.max_new_runaway_share * items)
    examples = [e for r in counted for e in r.examples][:RUNAWAY_EXAMPLES]
    text = (f"Runaways (more than {RUNAWAY_WORD_RATIO:g} x the reference's words + {RUNAWAY_EXTRA_WORDS}, or a "
            f"phrase {LOOP_REPEATS} times in a row): candidate {sum(r.candidate for r in counted)}, stable "
            f"{sum(r.stable for r in counted)} of {items} items; {new} where only the candidate runs away, "
            f"{allowed} allowed ({settings.max_new_runaway_share:.1%})")
    if new > allowed:
        return False, f"{text}: too many (e.g. {', '.join(examples)})."
    return True, text + "."


def gate(heldout: SetComparison, golden: Sequence[SetComparison], settings: GateSettings,
         generalisation: Sequence[SetComparison] = ()) -> GateDecision:
    """Pass when the held-out WER improves with the whole interval below zero (if required),
    each generalisation set's WER is at most `max_generalisation_ratio` x the stable's, each
    golden part's WER worsens by at most `max_golden_relative_worsening` of the stable's, and the
    candidate runs away where the stable did not on at most `max_new_runaway_share` of all items.
    No data is a failed check, never a pass: a gate without a golden part fails."""
    checks = [_heldout_check(heldout, settings), *(_generalisation_check(g, settings) for g in generalisation)]
    checks += [_golden_check(g, settings) for g in golden] or [(False, "No golden set: forgetting cannot be judged.")]
    checks.append(_runaway_check([heldout, *generalisation, *golden], settings))
    reasons = [text for ok, text in checks if not ok] + [text for ok, text in checks if ok]
    return GateDecision(passed=all(ok for ok, _ in checks), reasons=reasons)


# --- the report -------------------------------------------------------------------------------
def _now() -> datetime:
    return datetime.now(UTC)


class EvaluationReport(BaseModel):
    candidate_version: str
    stable_version: str
    heldout: SetComparison
    golden: list[SetComparison]
    """One per golden part (manifest), each judged on its own."""
    generalisation: list[SetComparison] = []
    decision: GateDecision
    gate: GateSettings
    """The thresholds the decision was taken with."""
    engine: str | None = None
    started_at: datetime = Field(default_factory=_now)
    finished_at: datetime = Field(default_factory=_now)


def summary_lines(report: EvaluationReport) -> list[str]:
    """One line per judged set (held-out, each generalisation set, each golden part): what a
    person reads first."""
    named = [("held-out", report.heldout), *(("generalisation", c) for c in report.generalisation),
             *(("golden part", c) for c in report.golden)]
    lines = []
    for kind, c in named:
        o = c.overall
        ratio = f" = {o.wer_ratio:.2f} x" if o.stable.wer else ""
        interval = f", {c.confidence:.0%} CI {_interval_cell(o.interval)}" if o.interval else ""
        lines.append(f"{kind} {c.name}: WER {o.stable.wer:.2f} % -> {o.candidate.wer:.2f} %{ratio} "
                     f"({o.wer_diff:+.2f} points{interval}, {o.n} clips)")
    return lines


REPORT_JSON = "evaluation.json"
REPORT_MARKDOWN = "evaluation.md"


def write_report(report: EvaluationReport, out_dir: Path) -> tuple[Path, Path]:
    """Write `evaluation.json` (loads back with `EvaluationReport.model_validate_json`) and
    `evaluation.md` (for people) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / REPORT_JSON, out_dir / REPORT_MARKDOWN
    json_path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    md_path.write_text(format_markdown(report), encoding="utf-8")
    return json_path, md_path


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _interval_cell(interval: Interval | None) -> str:
    return "—" if interval is None else f"[{interval.low:+.2f}, {interval.high:+.2f}]"


def _row(field: str, value: str, c: Comparison) -> str:
    cells = [
        field, value, c.n,
        f"{c.stable.wer:.2f}", f"{c.candidate.wer:.2f}", f"{c.wer_diff:+.2f}", _interval_cell(c.interval),
        f"{c.stable.cer:.2f}", f"{c.candidate.cer:.2f}", f"{c.cer_diff:+.2f}",
    ]  # fmt: skip
    return "| " + " | ".join(_cell(x) for x in cells) + " |"


def _accuracy_cell(a: TermAccuracy) -> str:
    return "—" if a.accuracy is None else f"{a.found}/{a.total} ({a.accuracy:.1f} %)"


def _runaway_line(r: RunawayComparison | None) -> list[str]:
    if r is None:
        return []
    line = f"Runaways: stable {r.stable}, candidate {r.candidate} of {r.items} items; candidate only: {r.new}"
    return [line + (f" ({', '.join(_cell(e) for e in r.examples)})" if r.examples else "") + ".", ""]


def _set_markdown(title: str, c: SetComparison) -> list[str]:
    lines = [
        f"## {title}: {c.name}",
        "",
        (
            f"{c.overall.n} scored items. Intervals: {c.confidence:.0%} paired bootstrap over items "
            f"({c.bootstrap_samples} resamples, seed {c.seed}); slices under {MIN_SLICE_ITEMS_FOR_INTERVAL} "
            "items get none. Differences are candidate - stable, in points."
        ),
        "",
        (
            "| slice | value | n | stable WER % | candidate WER % | Δ WER | interval | stable CER % "
            "| candidate CER % | Δ CER |"
        ),
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|",
        _row("overall", "", c.overall),
    ]
    for field, by_value in c.slices.items():
        lines += [_row(field, value, comparison) for value, comparison in by_value.items()]
    lines += [
        "",
        "| terms found in the hypothesis | stable | candidate |",
        "|---|--:|--:|",
        f"| numbers | {_accuracy_cell(c.numbers.stable)} | {_accuracy_cell(c.numbers.candidate)} |",
        f"| proper nouns | {_accuracy_cell(c.proper_nouns.stable)} | {_accuracy_cell(c.proper_nouns.candidate)} |",
        "",
        *_runaway_line(c.runaways),
    ]
    return lines


def format_markdown(report: EvaluationReport) -> str:
    verdict = "PASSED" if report.decision.passed else "FAILED"
    lines = [
        f"# Evaluation: candidate {report.candidate_version} vs stable {report.stable_version}",
        "",
        f"**Decision: {verdict}**" + (f" (engine {report.engine})" if report.engine else ""),
        "",
        *[f"- {reason}" for reason in report.decision.reasons],
        "",
        (
            f"Gate: held-out improvement {'required' if report.gate.require_heldout_improvement else 'not required'}; "
            f"generalisation WER at most {report.gate.max_generalisation_ratio:.2f} x the stable's; "
            f"each golden part's WER may worsen by at most {report.gate.max_golden_relative_worsening:.1%} relative; "
            f"candidate-only runaways at most {report.gate.max_new_runaway_share:.1%} of items. "
            f"Evaluated {report.started_at:%Y-%m-%d %H:%M:%S %Z} to {report.finished_at:%Y-%m-%d %H:%M:%S %Z}."
        ),
        "",
        *_set_markdown("Held-out set", report.heldout),
        *(line for g in report.generalisation for line in _set_markdown("Generalisation set", g)),
        *(line for g in report.golden for line in _set_markdown("Golden part", g)),
    ]
    return "\n".join(lines)
