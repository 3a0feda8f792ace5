"""The evaluation gate (retrain/evaluate.py) on hand-made references and hypotheses: no model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from asrops.audio import audio_to_wav_bytes
from asrops.engines import Transcription
from asrops.evaluation import ItemCounts, ItemResult, item_counts, score
from asrops.retrain.evaluate import (
    MIN_SLICE_ITEMS_FOR_INTERVAL,
    EvaluationReport,
    SetComparison,
    compare,
    gate,
    number_tokens,
    paired_bootstrap,
    proper_noun_tokens,
    runs_away,
    term_counts,
    transcribe_manifest,
    write_report,
)
from asrops.settings import GateSettings

WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "basket", "candle", "forest", "meadow"]
REFERENCE = " ".join(WORDS)  # ten words that the normaliser leaves alone


SUBSTITUTES = ["pebble", "feather", "lantern", "harbour", "violin", "saddle", "marble", "orchard", "pillow", "tunnel"]


def _with_errors(k: int) -> str:
    """REFERENCE with its first `k` words substituted (by distinct words): exactly k word errors."""
    return " ".join(SUBSTITUTES[:k] + WORDS[k:])


def _item(i: int, hypothesis: str, reference: str = REFERENCE, **slices: str) -> ItemResult:
    return ItemResult(
        audio=f"/clips/{i}.wav", reference=reference, hypothesis=hypothesis, wer=None, duration_s=2.0, slices=slices
    )


def _results(errors: list[int], slices: list[dict[str, str]] | None = None) -> list[ItemResult]:
    slices = slices or [{} for _ in errors]
    return [_item(i, _with_errors(k), **s) for i, (k, s) in enumerate(zip(errors, slices))]


SETTINGS = GateSettings(bootstrap_samples=1000, confidence=0.95, max_golden_relative_worsening=0.02)


# --- paired bootstrap ---------------------------------------------------------------------------
def _simulated(n: int, p: float, rng: np.random.Generator) -> list[ItemCounts]:
    """n ten-word utterances with each word wrong with probability p."""
    return [ItemCounts(10, int(e), 50, 0) for e in rng.binomial(10, p, size=n)]


def test_bootstrap_excludes_zero_for_a_clearly_better_candidate():
    rng = np.random.default_rng(1)
    stable, candidate = _simulated(400, 0.20, rng), _simulated(400, 0.10, rng)
    t0 = time.perf_counter()
    interval = paired_bootstrap(candidate, stable, samples=1000, confidence=0.95, seed=0)
    assert time.perf_counter() - t0 < 0.5  # vectorised: 1000 resamples x 400 items
    true_diff = 100 * (0.10 - 0.20)
    assert interval.low < true_diff < interval.high
    assert interval.low < interval.diff < interval.high
    assert interval.high < 0 and interval.excludes_zero
    # The point estimate is the corpus difference on all items.
    expected = 100 * (sum(c.word_errors for c in candidate) - sum(s.word_errors for s in stable)) / 4000
    assert interval.diff == pytest.approx(expected)


def test_bootstrap_includes_zero_when_systems_differ_only_by_noise():
    rng = np.random.default_rng(2)
    stable = _simulated(300, 0.15, rng)
    # The same system decoded again: a few items change by one error either way.
    flips = rng.choice(300, size=20, replace=False)
    candidate = list(stable)
    for j, i in enumerate(flips):
        change = 1 if j % 2 else -1
        candidate[i] = stable[i]._replace(word_errors=max(0, stable[i].word_errors + change))
    interval = paired_bootstrap(candidate, stable, samples=1000, confidence=0.95, seed=0)
    assert interval.low < 0 < interval.high
    assert not interval.excludes_zero


def test_bootstrap_is_paired_identical_systems_give_zero_width():
    rng = np.random.default_rng(3)
    stable = _simulated(200, 0.3, rng)  # high per-item variance: unpaired resampling would be wide
    interval = paired_bootstrap(list(stable), stable, samples=500, confidence=0.9, seed=7)
    assert (interval.diff, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_bootstrap_is_reproducible_and_checks_its_input():
    rng = np.random.default_rng(4)
    a, b = _simulated(50, 0.1, rng), _simulated(50, 0.2, rng)
    assert paired_bootstrap(a, b, 200, 0.95, 5) == paired_bootstrap(a, b, 200, 0.95, 5)
    assert paired_bootstrap(a, b, 200, 0.95, 5) != paired_bootstrap(a, b, 200, 0.95, 6)
    with pytest.raises(ValueError, match="50 candidate items but 49"):
        paired_bootstrap(a, b[:-1])
    with pytest.raises(ValueError, match="item 0"):  # not the same reference
        paired_bootstrap([ItemCounts(9, 0, 40, 0)] + a[1:], b)
    with pytest.raises(ValueError, match="no scored items"):
        paired_bootstrap([None], [None])


# --- numbers and proper nouns -------------------------------------------------------------------
SENTENCE = "Send 25 dollars to Maria in Lisbon."


def test_number_and_proper_noun_tokens():
    assert number_tokens(SENTENCE) == ["$25"]  # Whisper's normaliser: "25 dollars" -> "$25"
    assert number_tokens("twenty-five apples and 3 pears") == ["25", "3"]
    assert proper_noun_tokens(SENTENCE) == ["maria", "lisbon"]  # "Send" starts the sentence
    assert proper_noun_tokens("Mr. Smith met Anna's sister. Then I left") == ["smith", "anna"]
    assert proper_noun_tokens('She said "Hello" and I agreed') == []  # quoted start, pronoun


@pytest.mark.parametrize(
    ("hypothesis", "numbers_found", "names_found"),
    [
        ("send twenty-five dollars to maria in lisbon", 1, 2),
        ("Send dollars to Maria in Lisbon.", 0, 2),  # misses the number
        ("send 25 dollars to mario in lisbon", 1, 1),  # misses a name
        ("send 52 dollars to marie in lisbon", 0, 1),
        ("", 0, 0),
    ],
)
def test_term_counts_on_crafted_hypotheses(hypothesis, numbers_found, names_found):
    counts = term_counts(SENTENCE, hypothesis)
    assert (counts.numbers, counts.proper_nouns) == (1, 2)
    assert (counts.numbers_found, counts.proper_nouns_found) == (numbers_found, names_found)


def test_compare_reports_term_accuracy_per_system():
    refs = [SENTENCE, "Call Peter at 5 pm."]
    stable = [_item(0, "send dollars to maria in lisbon", SENTENCE), _item(1, "call peter at 5 pm", refs[1])]
    candidate = [_item(0, "send 25 dollars to maria in lisbon", SENTENCE), _item(1, "call pita at 5 pm", refs[1])]
    c = compare(candidate, stable, SETTINGS, "terms")
    # Numbers: "$25" and "5" (stable misses "$25"); names: maria, lisbon, peter (candidate misses peter).
    assert (c.numbers.stable.found, c.numbers.stable.total) == (1, 2)
    assert c.numbers.stable.accuracy == pytest.approx(50.0)
    assert c.numbers.candidate.accuracy == pytest.approx(100.0)
    assert (c.proper_nouns.stable.found, c.proper_nouns.candidate.found, c.proper_nouns.candidate.total) == (3, 2, 3)
    assert c.proper_nouns.candidate.accuracy == pytest.approx(200 / 3)


# --- compare ------------------------------------------------------------------------------------
def test_compare_overall_and_slices_match_score():
    accents = ["us", "uk", "in"]
    slices = [{"accent": accents[i % 3], "domain": "banking" if i < 30 else "travel"} for i in range(60)]
    stable = _results([2 if i % 3 == 2 else 1 for i in range(60)], slices)
    candidate = _results([0 if i % 3 == 2 else 1 for i in range(60)], slices)  # fixes the "in" accent
    c = compare(candidate, stable, SETTINGS, "heldout")
    assert c.name == "heldout" and c.overall.n == 60
    expected = score([r.reference for r in candidate], [r.hypothesis for r in candidate])
    assert c.overall.candidate == expected
    assert c.overall.stable.wer == pytest.approx(100 * 80 / 600)
    assert c.overall.wer_diff == pytest.approx(100 * (40 - 80) / 600)
    assert c.overall.interval.diff == pytest.approx(c.overall.wer_diff)
    assert set(c.slices) == {"accent", "domain"}
    assert list(c.slices["accent"]) == ["in", "uk", "us"]
    india, us = c.slices["accent"]["in"], c.slices["accent"]["us"]
    assert (india.n, india.stable.wer, india.candidate.wer) == (20, 20.0, 0.0)
    assert india.interval is not None and india.interval.high < 0  # 20 items: gets an interval
    assert us.wer_diff == 0.0 and us.interval.low == us.interval.high == 0.0
    assert c.slices["domain"]["travel"].n == 30


def test_compare_gives_small_slices_no_interval_and_checks_pairing():
    n = MIN_SLICE_ITEMS_FOR_INTERVAL + 5
    slices = [{"voice": "rare" if i < 5 else "common"} for i in range(n)]
    stable, candidate = _results([1] * n, slices), _results([0] * n, slices)
    c = compare(candidate, stable, SETTINGS, "set")
    assert c.slices["voice"]["rare"].n == 5 and c.slices["voice"]["rare"].interval is None
    assert c.slices["voice"]["common"].interval is not None
    with pytest.raises(ValueError, match="item 0 differs"):
        compare(candidate[::-1], stable, SETTINGS, "set")
    with pytest.raises(ValueError, match="24 candidate results but 25"):
        compare(candidate[1:], stable, SETTINGS, "set")


def test_compare_uses_stored_counts_when_present():
    stable = _results([1] * 30)
    candidate = [r.model_copy(update={"counts": item_counts(r.reference, r.hypothesis)}) for r in _results([0] * 30)]
    c = compare(candidate, stable, SETTINGS, "set")
    assert (c.overall.candidate.word_errors, c.overall.stable.word_errors) == (0, 30)


# --- gate ---------------------------------------------------------------------------------------
def _heldout(better: bool) -> SetComparison:
    """100 items; a clearly better candidate fixes 3 errors on 60 of them, a noisy one fixes an
    error on 3 items and adds one on 2."""
    stable = [3 if i < 60 else 1 for i in range(100)]
    if better:
        candidate = [0 if i < 60 else 1 for i in range(100)]
    else:
        candidate = [e - 1 if i < 3 else e + 1 if 60 <= i < 62 else e for i, e in enumerate(stable)]
    return compare(_results(candidate), _results(stable), SETTINGS, "heldout")


def _golden(extra_errors: int) -> SetComparison:
    """100 ten-word items with one error each (WER 10 %); the candidate adds `extra_errors`."""
    stable = [1] * 100
    candidate = [2 if i < extra_errors else 1 for i in range(100)]
    return compare(_results(candidate), _results(stable), SETTINGS, "golden")


def test_gate_passes_a_clearly_better_candidate_that_holds_golden():
    heldout = _heldout(better=True)
    assert heldout.overall.interval.high < 0
    decision = gate(heldout, [_golden(0)], SETTINGS)
    assert decision.passed, decision.reasons
    assert len(decision.reasons) == 3  # held-out, the golden part, runaways
    assert "below zero" in decision.reasons[0] and "-18.00 points" in decision.reasons[0]
    assert "10.00 %" in decision.reasons[1] and "within" in decision.reasons[1]
    assert decision.reasons[2].startswith("Runaways") and "0 where only the candidate" in decision.reasons[2]
    # 1 % relative worsening is inside the 2 % margin.
    assert gate(heldout, [_golden(1)], SETTINGS).passed


def test_gate_fails_a_candidate_that_worsens_golden_by_three_percent():
    golden = _golden(3)  # 10.00 % -> 10.30 %: +3 % relative, margin 2 %
    assert golden.overall.candidate.wer == pytest.approx(10.3)
    decision = gate(_heldout(better=True), [golden], SETTINGS)
    assert not decision.passed
    first = decision.reasons[0]  # failed checks come first
    assert first.startswith("Golden part golden") and "+3.0% relative" in first and "beyond" in first
    assert "10.20 %" in first  # the limit: 10 % x 1.02
    # A looser margin lets the same candidate through.
    assert gate(
        _heldout(better=True), [golden], SETTINGS.model_copy(update={"max_golden_relative_worsening": 0.05})
    ).passed


def test_gate_fails_when_the_heldout_interval_includes_zero():
    heldout = _heldout(better=False)
    interval = heldout.overall.interval
    assert heldout.overall.wer_diff < 0 and interval.low < 0 < interval.high  # better, but not surely
    decision = gate(heldout, [_golden(0)], SETTINGS)
    assert not decision.passed
    assert decision.reasons[0].startswith("Held-out") and "not established" in decision.reasons[0]
    assert f"{interval.high:+.2f}" in decision.reasons[0]
    # Without the requirement, the same comparison passes.
    relaxed = SETTINGS.model_copy(update={"require_heldout_improvement": False})
    assert gate(heldout, [_golden(0)], relaxed).passed


def test_gate_fails_on_no_data():
    empty = compare([], [], SETTINGS, "empty")
    assert empty.overall.n == 0 and empty.overall.interval is None
    decision = gate(empty, [empty], SETTINGS, [empty])
    assert not decision.passed
    failed = decision.reasons[:3]
    assert all("no scored items" in reason for reason in failed), failed
    assert not gate(_heldout(better=True), [], SETTINGS).passed  # no golden set: forgetting unjudged


def test_each_golden_part_is_judged_on_its_own():
    """A clean synthetic part that improves must not hide a real-speech part that gets worse,
    though the two together are within the margin."""
    synthetic = compare(_results([0] * 100), _results([1] * 100), SETTINGS, "clean synthetic")  # 10 % -> 0 %
    real = compare(_results([2 if i < 5 else 1 for i in range(100)]), _results([1] * 100), SETTINGS, "real speech")
    both = compare(_results([0] * 100 + [2 if i < 5 else 1 for i in range(100)]), _results([1] * 200), SETTINGS, "")
    assert both.overall.wer_diff < 0  # together: better
    decision = gate(_heldout(better=True), [synthetic, real], SETTINGS)
    assert not decision.passed
    assert decision.reasons[0].startswith("Golden part real speech") and "+5.0% relative" in decision.reasons[0]
    assert any(r.startswith("Golden part clean synthetic") and "within" in r for r in decision.reasons[1:])


def test_generalisation_sets_need_the_candidate_well_below_the_stable():
    heldout, golden = _heldout(better=True), [_golden(0)]
    stable = _results([2] * 100)  # 20 %
    for candidate_errors, passes in ((1, True), (2, False)):  # 10 % (0.50 x) passes; 20 % (1.00 x) fails
        general = compare(_results([candidate_errors] * 100), stable, SETTINGS, "same drift, new sentences")
        decision = gate(heldout, golden, SETTINGS, [general])
        assert decision.passed is passes, decision.reasons
        line = next(r for r in decision.reasons if r.startswith("Generalisation"))
        assert f"{candidate_errors * 10 / 20:.2f} x" in line and "0.85 x" in line
    near = compare(_results([2 if i < 90 else 1 for i in range(100)]), stable, SETTINGS, "near")  # 0.95 x
    assert not gate(heldout, golden, SETTINGS, [near]).passed


def test_runs_away_flags_inserted_words_and_loops_not_ordinary_errors():
    assert not runs_away(REFERENCE, _with_errors(4))
    assert not runs_away(REFERENCE, REFERENCE + " and then")  # a few extra words
    assert runs_away(REFERENCE, REFERENCE + " " + " ".join(SUBSTITUTES))  # 20 words for 10
    assert runs_away(REFERENCE, "apple river stone cloud garden window the end the end the end")  # a loop
    assert runs_away("hello there", "thank you thank you thank you")
    assert not runs_away("no no no not now", "no no no not now")  # the speaker repeats, the model does not
    assert not runs_away(REFERENCE, "")


def test_gate_fails_a_candidate_that_runs_away_where_the_stable_did_not():
    stable = _results([1] * 100)
    looping = [r.model_copy(update={"hypothesis": r.hypothesis + " we will we will we will"}) if i < 3 else r
               for i, r in enumerate(_results([1] * 100))]
    golden = compare(looping, stable, SETTINGS, "golden")
    assert golden.runaways.new == 3 and golden.runaways.examples == ["/clips/0.wav", "/clips/1.wav", "/clips/2.wav"]
    # A margin on WER wide enough for 3 items' inserted words (10 % -> 11.8 %) does not let them through.
    relaxed = SETTINGS.model_copy(update={"max_golden_relative_worsening": 0.25})
    decision = gate(_heldout(better=True), [golden], relaxed)
    assert not decision.passed and decision.reasons[0].startswith("Runaways"), decision.reasons
    assert "3 where only the candidate runs away, 2 allowed" in decision.reasons[0]
    assert "/clips/0.wav" in decision.reasons[0]
    assert sum(r.startswith("Runaways") for r in decision.reasons) == 1 and decision.reasons[1].startswith("Held-out")
    # One in 300 judged items is within the 1 % allowed; the stable's own runaways do not count.
    one = compare(looping[:1] + stable[1:], stable, SETTINGS, "golden")
    assert gate(_heldout(better=True), [one, _golden(0)], relaxed).passed
    assert compare(stable, looping, SETTINGS, "golden").runaways.new == 0


# --- report -------------------------------------------------------------------------------------
def _report() -> EvaluationReport:
    accents = ["us", "uk", "in"]
    slices = [{"accent": accents[i % 3], "domain": "banking | cards" if i < 40 else "travel"} for i in range(90)]
    stable = _results([3 if i % 2 else 1 for i in range(90)], slices)
    candidate = _results([0 if i % 2 else 1 for i in range(90)], slices)
    heldout = compare(candidate, stable, SETTINGS, "heldout")
    golden = _golden(3)
    return EvaluationReport(
        candidate_version="v0002",
        stable_version="v0001",
        heldout=heldout,
        golden=[golden],
        decision=gate(heldout, [golden], SETTINGS),
        gate=SETTINGS,
        engine="onnx-int8",
    )


def test_markdown_report_shows_decision_and_every_slice(tmp_path):
    report = _report()
    json_path, md_path = write_report(report, tmp_path / "out")
    assert (json_path.name, md_path.name) == ("evaluation.json", "evaluation.md")
    md = md_path.read_text()
    assert "candidate v0002 vs stable v0001" in md
    assert "**Decision: FAILED**" in md
    for reason in report.decision.reasons:
        assert f"- {reason}" in md
    lines = md.splitlines()
    for comparison in (report.heldout, *report.golden):
        assert f": {comparison.name}" in md
        for field, by_value in comparison.slices.items():
            for value, c in by_value.items():
                escaped = value.replace("|", "\\|")
                row = next(line for line in lines if line.startswith(f"| {field} | {escaped} |"))
                assert f"| {c.stable.wer:.2f} | {c.candidate.wer:.2f} | {c.wer_diff:+.2f} |" in row
    overall = next(line for line in lines if line.startswith("| overall |"))
    assert "| 90 | 20.00 | 5.00 | -15.00 |" in overall
    assert "| numbers |" in md and "| proper nouns |" in md


def test_report_json_round_trip(tmp_path):
    report = _report()
    json_path, _ = write_report(report, tmp_path)
    loaded = EvaluationReport.model_validate_json(json_path.read_text())
    assert loaded == report
    raw = json.loads(json_path.read_text())
    assert raw["decision"]["passed"] is False
    assert raw["heldout"]["slices"]["accent"]["in"]["interval"]["high"] < 0


# --- transcribe_manifest (a fake engine: no model) ----------------------------------------------
class _ToneEngine:
    """Answers by each clip's tone, and records its batch sizes."""

    name = "fake"

    def __init__(self, answers: dict[int, str]):
        self.answers, self.batches = answers, []

    def transcribe(self, audios, options=None):
        self.batches.append(len(audios))
        out = []
        for samples in audios:
            hz = round(np.argmax(np.abs(np.fft.rfft(samples))) * 16_000 / len(samples), -2)
            out.append(Transcription(text=self.answers[int(hz)], segments=[], duration_s=len(samples) / 16_000))
        return out


def test_transcribe_manifest_batches_and_scores(tmp_path: Path):
    rows, answers = [], {}
    for i in range(10):
        hz = 300 + 100 * i
        t = np.arange(8_000) / 16_000
        (tmp_path / f"{i}.wav").write_bytes(audio_to_wav_bytes(0.3 * np.sin(2 * np.pi * hz * t)))
        rows.append({"audio": f"{i}.wav", "text": REFERENCE, "accent": "uk" if i < 4 else "us"})
        answers[hz] = _with_errors(i % 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    engine, calls = _ToneEngine(answers), []
    results = transcribe_manifest(
        engine, manifest, lambda done, total: calls.append((done, total)), batch_size=8,
        slice_fields=["accent", "domain"]
    )
    assert engine.batches == [8, 2]
    assert calls == [(8, 10), (10, 10)]
    assert [Path(r.audio).name for r in results] == [f"{i}.wav" for i in range(10)]
    assert [r.slices for r in results[3:5]] == [{"accent": "uk"}, {"accent": "us"}]  # "domain": no row has it
    assert [r.counts.word_errors for r in results[:4]] == [0, 1, 0, 1]
    assert results[1].wer == pytest.approx(10.0)


def test_summary_has_a_line_per_judged_set():
    from asrops.retrain.evaluate import summary_lines

    lines = summary_lines(_report())
    assert len(lines) == 2
    assert lines[0].startswith("held-out heldout: WER 20.00 % -> 5.00 % = 0.25 x (-15.00 points, 95% CI [")
    assert lines[1].startswith("golden part golden: WER 10.00 % -> 10.30 % = 1.03 x")


def test_the_drift_scenario_reports_each_sets_mean_and_spread_over_its_runs():
    from asrops.retrain.scenario import ScenarioRun, spread_lines

    runs = [ScenarioRun(seed=21 + i, ratios={"held-out": h, "generalisation: new sentences": g, "golden: real": r},
                        met=False, gate_passed=True, summary=[]) for i, (h, g, r) in
            enumerate([(0.6, 0.9, 1.01), (0.5, 0.8, 1.0), (0.7, 1.0, 1.03)])]
    table = {line.split(" | ")[0].lstrip("| "): line for line in spread_lines(runs) if line.startswith("| ")}
    assert "| 0.600 | 0.500 .. 0.700 | <= 0.7 |" in table["held-out"]
    assert "| 0.900 | 0.800 .. 1.000 | <= 0.85 |" in table["generalisation: new sentences"]
    assert "| 1.013 | 1.000 .. 1.030 | <= 1.02 |" in table["golden: real"]
