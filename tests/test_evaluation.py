"""Scoring, normalisation, manifests and per-slice evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asrops.audio import audio_to_wav_bytes
from asrops.evaluation import (
    EvalItem,
    core_english_filter,
    default_slice_fields,
    evaluate,
    format_report,
    load_manifest,
    score,
)
from asrops.textnorm import load_spelling_mapping, normalize_english
from tests.conftest import SPEECH_DIR


# --- normalisation -----------------------------------------------------------------------
def test_normalize_english_matches_whisper():
    # Outputs checked against transformers' EnglishTextNormalizer with whisper's english.json.
    assert normalize_english("The colour is Grey, twenty-five dollars.") == "the color is gray $25"
    assert normalize_english("Mr. Smith's colour") == "mister smith is color"
    assert normalize_english("Hmm, I've got 3 apples... uh, three!") == "i have got 3 apples 3"
    assert normalize_english("") == ""
    # Whisper joins spelled-out digit runs: "one two three" and "123" score as equal.
    assert normalize_english("one two three") == "123"


def test_normalizer_does_not_import_torch():
    """transformers' package import pulls in torch (~10 s); the normaliser must not need it."""
    code = (
        "import sys; from asrops.textnorm import normalize_english as n; "
        "assert n('Grey') == 'gray'; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_spelling_mapping_is_packaged():
    mapping = load_spelling_mapping()
    assert len(mapping) > 1500
    assert mapping["colour"] == "color"


# --- score -------------------------------------------------------------------------------
def test_score_one_deletion():
    s = score(["the cat sat on the mat"], ["the cat sat on mat"])
    assert s.wer == pytest.approx(100 / 6)
    assert (s.words, s.word_errors, s.n, s.skipped) == (6, 1, 1, 0)
    # "the " deleted: 4 of the 22 characters.
    assert (s.chars, s.char_errors) == (22, 4)
    assert s.cer == pytest.approx(100 * 4 / 22)


def test_score_normalises_both_sides():
    s = score(["Mr. Smith's colour"], ["mister smith's color"])
    assert (s.wer, s.cer, s.word_errors) == (0.0, 0.0, 0)
    s = score(["THE COLOUR IS GREY"], ["the color is gray."])
    assert s.wer == 0.0


def test_score_is_corpus_level_not_mean_of_utterances():
    ten = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    refs, hyps = [ten, "hello"], [ten, "goodbye"]
    s = score(refs, hyps)
    # 1 error in 11 words = 9.09 %; a mean of per-utterance rates would say (0 + 100) / 2 = 50 %.
    assert (s.word_errors, s.words) == (1, 11)
    assert s.wer == pytest.approx(100 / 11)


def test_score_counts_insertions_and_skips_empty_references():
    s = score(["a b", "uh", ""], ["a b c d", "anything", "x"])  # "uh" normalises to ""
    assert (s.n, s.skipped, s.words, s.word_errors) == (1, 2, 2, 2)
    assert s.wer == 100.0
    empty = score(["um"], ["hello"])
    assert (empty.n, empty.skipped, empty.wer, empty.words) == (0, 1, 0.0, 0)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        score(["a", "b"], ["a"])


# --- manifest ----------------------------------------------------------------------------
def _write_clip(path: Path, seconds: float, hz: float) -> None:
    t = np.arange(int(16_000 * seconds)) / 16_000
    path.write_bytes(audio_to_wav_bytes(0.3 * np.sin(2 * np.pi * hz * t)))


def test_load_manifest_resolves_relative_paths_and_keeps_extras(tmp_path):
    manifest = tmp_path / "sub" / "manifest.jsonl"
    (tmp_path / "sub" / "clips").mkdir(parents=True)
    absolute = tmp_path / "elsewhere" / "c.wav"
    rows = [
        {"audio": "clips/a.wav", "text": "hi", "source": "x", "duration_s": 0.5},
        {"audio": "../b.wav", "text": "yo", "source": "y"},
        {"audio": str(absolute), "text": "hey", "source": "y"},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_manifest(manifest)
    assert [i.audio for i in items] == [
        str(tmp_path / "sub" / "clips" / "a.wav"),
        str(tmp_path / "b.wav"),
        str(absolute),
    ]
    assert items[0].source == "x" and items[0].model_extra == {"source": "x", "duration_s": 0.5}
    only_y = load_manifest(manifest, filter=lambda item: item.source == "y")
    assert [i.text for i in only_y] == ["yo", "hey"]


def test_load_manifest_names_bad_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "text": "x"}\n{"audio": "b.wav"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        load_manifest(manifest)


def test_core_english_filter():
    base = {"audio": "a", "text": "t", "lang": "en", "tier": "gold", "duration_s": 5.0}
    assert core_english_filter(EvalItem(**base))
    assert core_english_filter(base)  # plain dicts work too
    for change in (
        {"lang": "de"},
        {"tier": "gold-longform"},
        {"subset": "speech-styles"},
        {"duration_s": 0.9},
        {"duration_s": 30.5},
    ):
        assert not core_english_filter(EvalItem(**{**base, **change})), change
    assert core_english_filter(EvalItem(**{**base, "subset": "spontaneous", "duration_s": 30}))


def test_core_subset_of_shared_speech_data():
    manifest = SPEECH_DIR / "manifest.jsonl"
    if not manifest.exists():
        pytest.skip(f"../shared/data/speech not found ({SPEECH_DIR})")
    items = load_manifest(manifest, filter=core_english_filter)
    assert len(items) == 245  # the README's count
    assert sum(i.duration_s for i in items) / 60 == pytest.approx(26.9, abs=0.05)
    assert all(Path(i.audio).is_absolute() and Path(i.audio).exists() for i in items)


# --- evaluate ----------------------------------------------------------------------------
def _sliced_items(tmp_path: Path) -> list[EvalItem]:
    """Four clips; the fake recogniser keys on each clip's tone to know what to answer."""
    specs = [
        ("a1", 0.5, 300, "good", "The cat sat on the mat."),
        ("a2", 1.0, 500, "good", "Colour me surprised"),
        ("b1", 0.5, 700, "bad", "red green blue yellow"),
        ("b2", 0.75, 900, "bad", "black white"),
    ]
    rows = []
    for name, seconds, hz, group, text in specs:
        _write_clip(tmp_path / f"{name}.wav", seconds, hz)
        rows.append({"audio": f"{name}.wav", "text": text, "group": group, "hz": hz})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    return load_manifest(manifest)


def _fake_transcribe(batch: list[np.ndarray]) -> list[str]:
    answers = {
        300: "the cat sat on the mat",
        500: "color me surprised",
        700: "red green glue",  # 1 substitution + 1 deletion
        900: "black white grey",  # 1 insertion
    }
    out = []
    for samples in batch:
        assert samples.dtype == np.float32
        hz = round(np.argmax(np.abs(np.fft.rfft(samples))) * 16_000 / len(samples), -2)
        out.append(answers[int(hz)])
    return out


def test_evaluate_scores_overall_and_per_slice(tmp_path):
    items = _sliced_items(tmp_path)
    calls = []
    report = evaluate(
        _fake_transcribe,
        items,
        slice_fields=["group"],
        batch_size=3,
        progress=lambda done, total: calls.append((done, total)),
        engine="fake",
    )
    assert calls == [(3, 4), (4, 4)]
    good, bad = report.slices["group"]["good"], report.slices["group"]["bad"]
    assert (good.wer, good.n, good.words) == (0.0, 2, 9)
    assert (bad.word_errors, bad.words, bad.n) == (3, 6, 2)
    assert bad.wer == pytest.approx(50.0)
    assert report.overall.wer == pytest.approx(100 * 3 / 15)
    assert report.n == 4 and report.engine == "fake" and report.version is None
    assert report.audio_s == pytest.approx(2.75)
    assert report.wall_s > 0 and report.rtfx == pytest.approx(report.audio_s / report.wall_s)
    rows = {Path(r.audio).name: r for r in report.items}
    assert rows["b1.wav"].wer == pytest.approx(50.0)
    assert rows["b1.wav"].hypothesis == "red green glue"
    assert rows["a2.wav"].wer == 0.0 and rows["a2.wav"].slices == {"group": "good"}

    text = format_report(report)
    assert "engine: fake" in text
    lines = text.splitlines()
    assert any(line.split()[:3] == ["overall", "4", "20.00"] for line in lines)
    assert any(line.split()[:4] == ["group", "bad", "2", "50.00"] for line in lines)
    assert any(line.split()[:4] == ["group", "good", "2", "0.00"] for line in lines)


def test_evaluate_default_slices(tmp_path):
    items = _sliced_items(tmp_path)
    # group: 2 values -> slice; hz: 4 ints -> slice; a field set on one item gets "(none)".
    items[0] = EvalItem(**items[0].model_dump(), subset="spontaneous", notes="not a slice")
    items[1] = EvalItem(**items[1].model_dump(), score=0.5)  # floats are not slices
    assert default_slice_fields(items) == ["group", "hz", "subset"]
    report = evaluate(_fake_transcribe, items)
    assert set(report.slices) == {"group", "hz", "subset"}
    assert {v: s.n for v, s in report.slices["subset"].items()} == {"(none)": 3, "spontaneous": 1}
    assert report.slices["hz"]["900"].word_errors == 1


def test_evaluate_rejects_wrong_number_of_hypotheses(tmp_path):
    items = _sliced_items(tmp_path)
    with pytest.raises(ValueError, match="returned 1 texts for 2 inputs"):
        evaluate(lambda batch: ["x"], items, batch_size=2)
