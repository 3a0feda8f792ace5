"""asrops.synth: templates, effects, the generator and `asrops synth`. No Whisper here; the
tests that speak need espeak-ng (and flite for its voice) and are skipped without them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from asrops.audio import SAMPLE_RATE
from asrops.clip_manifest import read_rows as load_rows
from asrops.synth import effects
from asrops.synth.generate import PRESETS, SynthRow, SynthSpec, generate, plan, speaking
from asrops.synth.text import (
    BROAD,
    DOMAINS,
    TEMPLATES,
    UNSEEN,
    sentence_count,
    shared_templates,
    split_templates,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng not installed (scripts/setup.sh installs it)",
)
needs_flite = pytest.mark.skipif(
    shutil.which("flite") is None, reason="flite not installed (scripts/setup.sh installs it)"
)


def _bursts(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Speech-like test signal: 250-ms tone bursts with silent gaps between them."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    on = (t % 0.5) < 0.25
    rng = np.random.default_rng(seed)
    tone = 0.5 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)
    return (tone * on).astype(np.float32)


# --- text --------------------------------------------------------------------------------
def test_every_domain_has_hundreds_of_sentences_and_stable_ids():
    for domain in DOMAINS:
        assert sentence_count(domain) >= 300, domain
    assert all(t.id.startswith(f"{t.domain}-") for t in TEMPLATES.values())
    rng = np.random.default_rng(0)
    texts = {TEMPLATES["medical-06"].render(rng) for _ in range(50)}
    assert len(texts) > 40
    assert all("{" not in s for s in texts)


def test_split_templates_is_disjoint_and_plans_respect_it():
    train, test = split_templates(test_fraction=0.25, seed=1)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(TEMPLATES)
    assert {t.split("-")[0] for t in test} == set(DOMAINS)
    assert split_templates(0.25, seed=1) == (train, test)

    def rows(ids, seed):
        clips = plan(SynthSpec(n=60, template_ids=ids, seed=seed))
        return [{"template": c.template} for c in clips]

    train_rows, test_rows = rows(train, 0), rows(test, 0)
    assert {r["template"] for r in train_rows} <= set(train)
    assert shared_templates(train_rows, test_rows) == set()
    assert shared_templates(train_rows, rows(train, 1))


def _template_patterns() -> list:
    import re

    return [re.compile(re.sub(r"\\\{[a-z]+\d?\\\}", ".+", re.escape(t.pattern)), re.IGNORECASE)
            for t in TEMPLATES.values()]


def test_broad_sentences_are_in_no_template_nor_the_unseen_set_and_repeats_change_voice():
    """What a retrain speaks in a drift's acoustics must teach no sentence shape the corrections
    or the generalisation set have; a sentence said twice is said by another voice."""
    patterns = _template_patterns()
    unseen = {t.pattern.lower() for t in UNSEEN.values()}
    sentences = [t.pattern for t in BROAD.values()]
    assert len(set(sentences)) == len(sentences) >= 200
    for sentence in sentences:
        assert not any(p.fullmatch(sentence) for p in patterns), sentence
        assert sentence.lower() not in unseen, sentence
    drift = PRESETS["drift-accent-noise"]
    assert speaking(drift, "unseen", 48, 7).domains == drift.domains  # the generalisation set keeps them
    spec = speaking(drift, "broad", 300, 7)
    assert (spec.voices, spec.snr_db, spec.rate) == (drift.voices, drift.snr_db, drift.rate)
    clips = plan(spec)
    assert {c.template for c in clips} <= set(BROAD) and {c.domain for c in clips} == set(DOMAINS)
    assert len({c.text for c in clips}) == 200  # every sentence before any twice
    assert len({(c.text, c.voice.name) for c in clips}) == 300  # and a repeat in the other voice


def test_unseen_sentences_fit_no_template_and_each_is_spoken_once_before_twice():
    """A generalisation set is only evidence if no template could have produced its sentences."""

    patterns = _template_patterns()
    rendered = TEMPLATES["medical-06"].render(np.random.default_rng(3))
    assert any(p.fullmatch(rendered) for p in patterns)  # a template's sentence is caught
    for t in UNSEEN.values():
        assert not any(p.fullmatch(t.pattern) for p in patterns), t.pattern
        assert t.render(np.random.default_rng(0)) == t.pattern
    spec = SynthSpec(n=48, voices=["en-gb-scotland", "en-029"], domains=["medical", "numbers"], text="unseen")
    clips = plan(spec)
    assert {c.template for c in clips} <= set(UNSEEN)
    for domain in ("medical", "numbers"):
        texts = [c.text for c in clips if c.domain == domain]
        assert len(texts) == 24 and len(set(texts)) == 24, domain  # 24 sentences each: no repeat
    with pytest.raises(ValueError, match="unknown template ids"):
        SynthSpec(text="unseen", template_ids=["medical-01"])


# --- spec --------------------------------------------------------------------------------
def test_spec_validation_and_voice_selection():
    bad_specs = [
        {"voices": ["nope"]},
        {"rate": (200, 150)},
        {"template_ids": ["medical-99"]},
        {"accents": ["en-mars"]},
        {"domains": ["medical"], "template_ids": ["general-01"]},
    ]
    for bad in bad_specs:
        with pytest.raises(ValueError):
            SynthSpec(**bad)
    spec = SynthSpec(voices="all", accents=["en-gb-scotland"])
    assert {v.name for v in spec.selected_voices()} == {"en-gb-scotland", "awb"}
    assert set(PRESETS) == {"clean", "drift-accent-noise", "telephone"}


def test_plan_is_deterministic_and_seed_dependent():
    spec = SynthSpec(n=20, voices=["en-us", "en-029"], domains=["finance", "numbers"])
    first, again = plan(spec), plan(spec)
    assert [c.text for c in first] == [c.text for c in again]
    other = plan(spec.model_copy(update={"seed": 1}))
    assert sum(a.text != b.text for a, b in zip(first, other)) > 15
    assert [c.voice.name for c in first[:4]] == ["en-us", "en-029"] * 2
    assert [c.domain for c in first[:4]] == ["finance", "finance", "numbers", "numbers"]
    assert all(160 <= c.rate <= 190 for c in first)


# --- effects -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["white", "babble"])
@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_add_noise_hits_the_requested_snr(kind, snr):
    x = _bursts()
    y = effects.add_noise(x, snr, np.random.default_rng(3), kind)
    assert abs(effects.snr_db(x, y - x) - snr) < 0.5
    # active-speech power: the silent half does not dilute it (a whole-clip SNR would be 3 dB lower)
    assert effects.speech_power(x) > 1.8 * np.mean(x.astype(np.float64) ** 2)


@pytest.mark.parametrize("use_mulaw", [False, True])
def test_telephone_removes_everything_above_4_khz(use_mulaw):
    x = (0.3 * np.random.default_rng(0).standard_normal(SAMPLE_RATE)).astype(np.float32)
    y = effects.telephone(x, use_mulaw=use_mulaw)
    assert y.shape == x.shape and y.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(y)) ** 2
    freqs = np.fft.rfftfreq(len(y), 1 / SAMPLE_RATE)
    assert spectrum[freqs > 4000].sum() / spectrum.sum() < 0.01
    assert spectrum[freqs < 200].sum() / spectrum.sum() < 0.01


def test_mulaw_round_trip_is_close():
    x = np.linspace(-1, 1, 1001)
    assert np.max(np.abs(effects.mulaw(x) - x)) < 0.04


def test_reverb_lengthens_the_tail():
    x = np.zeros(SAMPLE_RATE, np.float32)
    half = SAMPLE_RATE // 2
    x[:half] = 0.5 * np.sin(2 * np.pi * 220 * np.arange(half) / SAMPLE_RATE)
    y = effects.reverb(x, 0.4, np.random.default_rng(0))
    assert len(y) == len(x) + int(0.4 * SAMPLE_RATE) - 1
    after = slice(half + 800, half + 2400)  # 50-150 ms after the sound stops
    assert np.mean(y[after] ** 2) > 1e-3 * np.mean(x[:half] ** 2)
    assert np.mean(x[after] ** 2) == 0
    short = effects.reverb(x, 0.1, np.random.default_rng(0))
    assert np.mean(short[after] ** 2) < np.mean(y[after] ** 2)


# --- generation --------------------------------------------------------------------------
@needs_espeak
def test_generate_writes_audio_and_manifest(tmp_path):
    spec = SynthSpec(
        n=6, voices=["en-us", "en-gb-scotland"], snr_db=10, domains=["medical", "numbers"], seed=4
    )
    progress: list[str] = []
    manifest = generate(spec, tmp_path / "set", progress.append)
    assert manifest == tmp_path / "set" / "manifest.jsonl"
    assert progress[-1].strip() == "synthesised 6/6"
    rows = load_rows(manifest)
    assert len(rows) == 6
    assert set(rows[0]) == set(SynthRow.model_fields)
    assert [r["voice"] for r in rows] == ["en-us", "en-gb-scotland"] * 3
    assert {r["accent"] for r in rows} == {"en-us", "en-gb-scotland"}
    assert {r["domain"] for r in rows} == {"medical", "numbers"}
    for r in rows:
        assert r["engine"] == "espeak-ng"
        assert (r["snr_db"], r["snr_db_value"], r["noise"]) == ("10", 10.0, "white")
        assert (r["reverb"], r["telephone"]) == ("none", False)
        assert r["template"] in TEMPLATES and r["template"].startswith(r["domain"])
        info = sf.info(tmp_path / "set" / r["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
        assert info.duration == pytest.approx(r["duration_s"], abs=0.002)
        words_per_s = len(r["text"].split()) / r["duration_s"]
        assert 1 <= words_per_s <= 6, r
    assert json.loads((tmp_path / "set" / "spec.json").read_text())["snr_db"] == 10


@needs_espeak
def test_generation_is_deterministic(tmp_path):
    spec = SynthSpec(n=3, voices=["en-us"], seed=7)
    a, b = generate(spec, tmp_path / "a"), generate(spec, tmp_path / "b")
    assert load_rows(a) == load_rows(b)
    for r in load_rows(a):
        audio_a, audio_b = (tmp_path / d / r["audio"] for d in "ab")
        assert audio_a.read_bytes() == audio_b.read_bytes()
    c = generate(spec.model_copy(update={"seed": 8}), tmp_path / "c")
    assert [r["text"] for r in load_rows(c)] != [r["text"] for r in load_rows(a)]


@needs_flite
def test_flite_voice_with_reverb_and_telephone(tmp_path):
    spec = SynthSpec(
        n=2, voices=["slt"], reverb_rt60_s=0.3, telephone=True, snr_db=20, noise="babble"
    )
    rows = load_rows(generate(spec, tmp_path))
    assert {(r["engine"], r["accent"], r["reverb"], r["telephone"], r["noise"]) for r in rows} == {
        ("flite", "en-us", "0.3", True, "babble")
    }
    audio, rate = sf.read(tmp_path / rows[0]["audio"])
    assert rate == SAMPLE_RATE and audio.ndim == 1
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    assert spectrum[np.fft.rfftfreq(len(audio), 1 / rate) > 4000].sum() / spectrum.sum() < 0.01


@needs_espeak
def test_cli_synth_with_preset_and_overrides(tmp_path):
    from asrops.cli.main import app

    args = ["--preset", "drift-accent-noise", "--n", "2", "--snr-db", "5", "--seed", "3"]
    result = CliRunner().invoke(app, ["synth", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    rows = load_rows(tmp_path / "manifest.jsonl")
    assert [r["voice"] for r in rows] == ["en-gb-scotland", "en-029"]
    assert all(r["snr_db"] == "5" and 185 <= r["rate"] <= 205 for r in rows)
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--voices", "martian"])
    assert bad.exit_code != 0 and "unknown voices" in bad.output
