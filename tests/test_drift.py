"""Drift monitoring (monitoring/drift.py, monitoring/verdict.py) on realistic request features:
no false alarms on the reference's own distribution, a verdict within a few windows when the
audio gets noisy and transcripts go wrong, no crash on degenerate columns, saved results that
round-trip, and an HTML report that really renders in a browser. No Ray, no service."""

from __future__ import annotations

import re
import subprocess
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from asrops.monitoring import drift
from asrops.monitoring.drift import DriftRun, compute_drift, load_result, save_reports
from asrops.monitoring.verdict import VerdictPolicy, VerdictState, WindowJudgement
from asrops.settings import DriftSettings

CHROMIUM = Path("/usr/bin/chromium")
SETTINGS = DriftSettings()  # K=2 of N=3, min_samples 30, drift_share 0.5
WINDOW = 40
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)

# --- a generator of request features --------------------------------------------------------

NAMES = ["Anna", "Bob", "Carla", "Dmitri", "Esther", "Farid", "Grace", "Hiro", "Ines", "Jamal",
         "Kofi", "Lena", "Marta", "Nils", "Olga", "Priya"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
DRUGS = ["ibuprofen", "amoxicillin", "metformin", "lisinopril", "paracetamol"]
CITIES = ["Lisbon", "Denver", "Osaka", "Nairobi", "Glasgow", "Toronto"]
TEMPLATES = [
    "please schedule a follow up with {name} on {day} at {hour} o'clock",
    "the patient {name} needs {num} milligrams of {drug} twice a day",
    "send invoice number {num} to {name} before {day}",
    "{name} will meet us in room {num} after lunch on {day}",
    "can you remind {name} to call the pharmacy about the {drug} refill",
    "our flight to {city} leaves at {hour} thirty on {day} morning",
    "{name} said the quarterly report is almost ready for review",
    "the delivery for {name} arrives in {city} on {day} around {hour}",
]
# What tiny.en writes for noisy accented speech: mishearings with a vocabulary of their own.
GARBLED = [
    "share your laugh on the {w} {w}",
    "{w} {w} thank you thank you",
    "shed you'll a fall oh {w} up",
    "the the {w} uh {w}",
    "so {w} to meet the {w} dog",
]
GARBLE_WORDS = ["laugh", "shed", "dog", "fall", "meat", "sew", "heir", "knot", "whale", "bark"]


def _sentence(rng: np.random.Generator, garbled: bool) -> str:
    if garbled:
        t = GARBLED[rng.integers(len(GARBLED))]
        return re.sub(r"\{w\}", lambda _: GARBLE_WORDS[rng.integers(len(GARBLE_WORDS))], t)
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(
        name=NAMES[rng.integers(len(NAMES))], day=DAYS[rng.integers(len(DAYS))],
        hour=int(rng.integers(1, 13)), num=int(rng.integers(2, 900)),
        drug=DRUGS[rng.integers(len(DRUGS))], city=CITIES[rng.integers(len(CITIES))],
    )


def make_requests(seed: int, n: int, *, noisy: bool = False) -> pd.DataFrame:
    """n requests' features as the production log holds them. `noisy`: the audio arrives with
    15 dB less SNR (noise fills the pauses and raises the spectral centroid) and tiny.en
    mishears it (lower log-prob, more no-speech, garbled, repetitive, out-of-vocabulary)."""
    rng = np.random.default_rng(seed)
    text = [_sentence(rng, noisy) for _ in range(n)]
    words = np.array([len(t.split()) for t in text], dtype=float)
    duration = np.clip(words / rng.normal(2.6, 0.35, n) + rng.gamma(2.0, 0.25, n), 0.5, 30.0)
    rms = rng.normal(-24.0, 3.0, n) + (3.0 if noisy else 0.0)
    return pd.DataFrame({
        "duration_s": duration,
        "rms_dbfs": rms,
        "peak": np.clip(10 ** (rms / 20) * rng.normal(5.0, 0.8, n), 0.0, 1.0),
        "clipping_ratio": rng.exponential(2e-4, n) * (rng.random(n) < 0.1),
        "snr_db": rng.normal(28.0 - (15.0 if noisy else 0.0), 5.0, n),
        "silence_ratio": rng.beta(1.0, 12.0, n) if noisy else rng.beta(2.0, 6.0, n),
        "spectral_centroid_hz": rng.normal(2600.0 if noisy else 1800.0, 300.0, n),
        "words": words,
        "characters": np.array([len(t) for t in text], dtype=float),
        "words_per_s": words / duration,
        "avg_logprob": rng.normal(-0.8 if noisy else -0.25, 0.12 if noisy else 0.08, n),
        "no_speech_prob": rng.beta(2.0, 8.0, n) if noisy else rng.beta(1.0, 30.0, n),
        "compression_ratio": rng.normal(2.1 if noisy else 1.45, 0.3 if noisy else 0.12, n),
        "oov_share": rng.beta(3.0, 10.0, n) if noisy else rng.beta(1.0, 60.0, n),
        "low_confidence_word_share": rng.beta(3.0, 8.0, n) if noisy else rng.beta(1.0, 25.0, n),
        "original_sample_rate": rng.choice([16000, 44100, 48000], n, p=[0.5, 0.2, 0.3]),
        "original_channels": rng.choice([1, 2], n, p=[0.7, 0.3]),
        "text": text,
    })


FEATURES = [*SETTINGS.numeric_features, *SETTINGS.categorical_features, SETTINGS.text_feature]


@pytest.mark.parametrize(("n_reference", "n_current", "options"), [
    (30, 8, {}), (8, 30, {"p_value": 0.01, "iter_num": 300}), (300, 40, {"iter_num": 300}),
    (1, 1, {"iter_num": 300})])
def test_our_text_null_distribution_is_evidentlys(n_reference: int, n_current: int, options: dict) -> None:
    """monitoring/drift.py replaces Evidently's null distribution for text drift (1000 sklearn
    ROC AUCs, 3.3-4.0 s a call here) with a rank computation: the same percentile for a
    window's shuffled labels, and NumPy's global generator left in the same state."""
    from evidently.legacy.utils import data_drift_utils

    assert data_drift_utils.roc_auc_random_classifier_percentile is drift.random_classifier_auc_percentile
    labels = np.array([0] * n_reference + [1] * n_current)
    np.random.default_rng(n_reference).shuffle(labels)
    y_test = pd.Series(labels)
    expected = drift.EVIDENTLY_RANDOM_AUC_PERCENTILE(y_test, **options)
    after_evidentlys = np.random.random()
    assert drift.random_classifier_auc_percentile(y_test, **options) == pytest.approx(expected, abs=1e-12)
    assert np.random.random() == after_evidentlys


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return make_requests(seed=1, n=300)


@pytest.fixture(scope="module")
def shifted_run(reference: pd.DataFrame) -> DriftRun:
    return compute_drift(make_requests(seed=500, n=WINDOW, noisy=True), reference, SETTINGS)


def _judge(policy: VerdictPolicy, i: int, run: DriftRun) -> WindowJudgement:
    return policy.judge(T0 + timedelta(minutes=5 * i), run.result.n_current,
                        run.result.drift_share, run.result.drifted)


# --- judgements -----------------------------------------------------------------------------


def test_same_distribution_never_gives_a_drift_verdict(reference: pd.DataFrame) -> None:
    policy = VerdictPolicy(SETTINGS)
    history: list[WindowJudgement] = []
    shares = []
    for i in range(20):
        run = compute_drift(make_requests(seed=100 + i, n=WINDOW), reference, SETTINGS)
        assert {c.column for c in run.result.scored_columns} == set(FEATURES), run.result.columns
        shares.append(run.result.drift_share)
        history.append(_judge(policy, i, run))
        verdict = policy.decide(history)
        assert verdict.state is not VerdictState.DRIFT, verdict.log_message()
    assert verdict.state is VerdictState.NO_DRIFT
    assert verdict.judged_windows == SETTINGS.verdict_windows
    assert max(shares) < SETTINGS.drift_share, shares


def test_noisy_audio_and_garbled_text_drift_within_three_windows(
    reference: pd.DataFrame, shifted_run: DriftRun
) -> None:
    r = shifted_run.result
    assert r.drifted and r.drift_share >= SETTINGS.drift_share
    for column in ("snr_db", "avg_logprob", "no_speech_prob", "text"):
        assert r.column(column).drifted, r.column(column)
    assert not r.column("original_sample_rate").drifted  # what did not change is not blamed

    policy = VerdictPolicy(SETTINGS)
    history = [policy.judge(T0, WINDOW, 0.0, False)]  # a calm window before the change
    states = []
    for i in range(1, 4):
        run = shifted_run if i == 1 else compute_drift(
            make_requests(seed=500 + i, n=WINDOW, noisy=True), reference, SETTINGS)
        history.append(_judge(policy, i, run))
        states.append(policy.decide(history).state)
        if states[-1] is VerdictState.DRIFT:
            break
    assert states[-1] is VerdictState.DRIFT, states
    verdict = policy.decide(history)
    assert verdict.drifted_windows >= SETTINGS.verdict_drifted
    message = verdict.log_message()
    for part in ("drift", f"K={SETTINGS.verdict_drifted}", f"N={SETTINGS.verdict_windows}",
                 f"min {SETTINGS.min_samples}", f"samples={WINDOW}"):
        assert part in message, message


def test_shipped_defaults_do_not_false_alarm_with_a_production_size_reference() -> None:
    reference = make_requests(seed=2, n=SETTINGS.reference_rows)
    for i in range(3):
        run = compute_drift(make_requests(seed=200 + i, n=WINDOW), reference, SETTINGS)
        assert not run.result.drifted, (run.result.drift_share, run.result.drifted_columns)


def test_p_value_tests_do_not_false_alarm_with_a_production_size_reference() -> None:
    """What the fix above gives: stat tests judge small windows against a large reference."""
    settings = SETTINGS.model_copy(
        update={"numeric_method": "ks", "categorical_method": "chisquare"})
    reference = make_requests(seed=2, n=settings.reference_rows)
    policy = VerdictPolicy(settings)
    history = []
    for i in range(3):
        run = compute_drift(make_requests(seed=200 + i, n=WINDOW), reference, settings)
        assert run.result.drift_share < settings.drift_share, run.result.drifted_columns
        history.append(_judge(policy, i, run))
    assert policy.decide(history).state is VerdictState.NO_DRIFT
    noisy = compute_drift(make_requests(seed=600, n=WINDOW, noisy=True), reference, settings)
    assert noisy.result.drifted


def test_tiny_vocabulary_text_does_not_sink_the_report(reference: pd.DataFrame) -> None:
    rng = np.random.default_rng(7)
    ref = reference.assign(text=rng.choice(["yes", "no"], len(reference), p=[0.8, 0.2]))
    cur = make_requests(seed=8, n=WINDOW)
    cur = cur.assign(text=rng.choice(["yes", "no"], WINDOW, p=[0.8, 0.2]))
    run = compute_drift(cur, ref, SETTINGS)
    text = run.result.column("text")
    assert text.error and "no terms remain" in text.error and text.score is None
    assert not text.drifted
    numeric = [run.result.column(c) for c in SETTINGS.numeric_features]
    assert all(c.error is None and c.score is not None for c in numeric), numeric
    assert len(run.result.scored_columns) == len(FEATURES) - 1
    # The other columns' report is still there to save.
    scored_by_evidently = {m["config"].get("column") for m in run.snapshot.dict()["metrics"]} - {None}
    assert scored_by_evidently == set(FEATURES) - {"text"}


def test_all_nan_column_is_an_error_not_a_crash(reference: pd.DataFrame) -> None:
    cur = make_requests(seed=9, n=WINDOW).assign(snr_db=np.nan)
    cur.loc[:4, "rms_dbfs"] = np.nan  # partly missing is fine: scored on the rest
    run = compute_drift(cur, reference, SETTINGS)
    snr = run.result.column("snr_db")
    assert snr.error and "current" in snr.error and snr.score is None and not snr.drifted
    assert run.result.column("rms_dbfs").error is None
    assert run.result.column("rms_dbfs").score is not None
    assert len(run.result.scored_columns) == len(FEATURES) - 1
    # The share counts only scored columns.
    scored = run.result.scored_columns
    assert run.result.drift_share == pytest.approx(sum(c.drifted for c in scored) / len(scored))


def test_a_feature_constant_in_the_window_prints_no_numpy_warning(reference: pd.DataFrame) -> None:
    """A window where one feature never varies (no clipping at all, say) is ordinary; Evidently's
    correlation widget divides by its zero spread, and numpy's warning reached the service's
    console at every such window."""
    column = SETTINGS.numeric_features[0]
    cur = make_requests(seed=10, n=WINDOW).assign(**{column: 0.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = compute_drift(cur, reference, SETTINGS)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert run.result.column(column).score is not None  # still scored: constant is not missing


def test_empty_window_scores_nothing_and_drifts_nothing(
    reference: pd.DataFrame, tmp_path: Path
) -> None:
    run = compute_drift(reference.iloc[:0], reference, SETTINGS)
    r = run.result
    assert r.n_current == 0 and not r.scored_columns and all(c.error for c in r.columns)
    assert (r.drift_share, r.drifted) == (0.0, False)
    assert load_result(save_reports(run, tmp_path, "empty").json) == r


def test_per_column_method_and_threshold_and_reference_sampling(reference: pd.DataFrame) -> None:
    settings = SETTINGS.model_copy(update={
        "numeric_features": ["snr_db", "avg_logprob"], "categorical_features": [],
        "text_feature": None, "numeric_method": "ks",
        "column_methods": {"snr_db": "wasserstein"}, "column_thresholds": {"snr_db": 0.3},
        "reference_rows": 100,
    })
    run = compute_drift(make_requests(seed=10, n=WINDOW, noisy=True), reference, settings)
    r = run.result
    assert [c.column for c in r.columns] == ["snr_db", "avg_logprob"]
    assert (r.column("snr_db").method, r.column("snr_db").threshold) == ("wasserstein", 0.3)
    assert (r.column("avg_logprob").method, r.column("avg_logprob").threshold) == ("ks", 0.05)
    assert r.column("snr_db").score > 0.3 and r.column("snr_db").drifted  # distance: above = drift
    assert r.column("avg_logprob").score < 0.05 and r.column("avg_logprob").drifted  # a p-value
    assert r.n_reference == 100 and r.n_current == WINDOW


def test_a_bad_method_fails_only_its_column(reference: pd.DataFrame) -> None:
    settings = SETTINGS.model_copy(update={"text_feature": None,
                                           "column_methods": {"snr_db": "no_such_test"}})
    run = compute_drift(make_requests(seed=12, n=WINDOW), reference, settings)
    assert "no_such_test" in (run.result.column("snr_db").error or "")
    others = [c for c in run.result.columns if c.column != "snr_db"]
    assert others and all(c.has_result for c in others)


def test_categories_match_across_types(reference: pd.DataFrame) -> None:
    """A sample rate logged as "16000" in one frame and 16000.0 (int met NaN) in the other is
    the same category, not drift."""
    settings = SETTINGS.model_copy(update={"numeric_features": [], "text_feature": None})
    cur = make_requests(seed=13, n=WINDOW)
    cur["original_sample_rate"] = cur["original_sample_rate"].astype(float)
    cur.loc[0, "original_sample_rate"] = np.nan
    ref = reference.assign(original_sample_rate=reference["original_sample_rate"].astype(str))
    run = compute_drift(cur, ref, settings)
    rate = run.result.column("original_sample_rate")
    assert rate.has_result and not rate.drifted, rate


# --- the verdict policy on hand-made histories ----------------------------------------------


def _w(i: int, samples: int, drifted: bool | None) -> WindowJudgement:
    return WindowJudgement(window_end=T0 + timedelta(minutes=5 * i), samples=samples,
                           drift_share=None if drifted is None else float(drifted), drifted=drifted)


def test_thin_data_is_insufficient_never_drift() -> None:
    policy = VerdictPolicy(SETTINGS)
    thin = SETTINGS.min_samples - 1
    # Thin windows are not judged even if a report called them drifted.
    history = [_w(i, thin, True) for i in range(6)]
    verdict = policy.decide(history)
    assert verdict.state is VerdictState.INSUFFICIENT_DATA and verdict.judged_windows == 0
    assert policy.judge(T0, thin, 0.9, True).drifted is None
    # Two drifted judged windows, then a thin latest one: no verdict on thin data.
    history = [_w(0, 40, True), _w(1, 40, True), _w(2, thin, True)]
    verdict = policy.decide(history)
    assert verdict.state is VerdictState.INSUFFICIENT_DATA
    assert verdict.latest_samples == thin and "thin" in verdict.log_message()
    # One judged window is fewer than K.
    assert policy.decide([_w(0, 40, True)]).state is VerdictState.INSUFFICIENT_DATA
    assert policy.decide([]).state is VerdictState.INSUFFICIENT_DATA
    # Thin windows in between are skipped, not counted: K of the last N *judged* windows.
    history = [_w(0, 40, True), _w(1, 3, None), _w(2, 40, False), _w(3, 40, True)]
    assert policy.decide(history).state is VerdictState.DRIFT
    history = [_w(0, 40, True), _w(1, 40, False), _w(2, 40, False), _w(3, 40, True)]
    assert policy.decide(history).state is VerdictState.NO_DRIFT  # the oldest fell out of N=3


def test_policy_refuses_k_greater_than_n() -> None:
    with pytest.raises(ValueError, match="never"):
        VerdictPolicy(SETTINGS.model_copy(update={"verdict_drifted": 4, "verdict_windows": 3}))


# --- saved results --------------------------------------------------------------------------


def test_json_round_trip(shifted_run: DriftRun, tmp_path: Path) -> None:
    paths = save_reports(shifted_run, tmp_path, "window-0001")
    assert paths.json == tmp_path / "window-0001.json" and paths.html.exists()
    loaded = load_result(paths.json)
    assert loaded == shifted_run.result
    assert loaded.computed_at.tzinfo is not None
    # Evidently's own results ride along, one ValueDrift per scored column.
    import json

    evidently = json.loads(paths.json.read_text())["evidently"]
    drift_metrics = {m["config"]["column"]: m for m in evidently["metrics"]
                     if m["config"]["type"] == "evidently:metric_v2:ValueDrift"}
    assert set(drift_metrics) == set(FEATURES)
    assert drift_metrics["snr_db"]["value"] == pytest.approx(loaded.column("snr_db").score)


def test_json_round_trip_with_failed_columns(reference: pd.DataFrame, tmp_path: Path) -> None:
    cur = make_requests(seed=11, n=WINDOW).assign(text="yes", snr_db=np.nan)
    run = compute_drift(cur, reference.assign(text="yes"), SETTINGS)
    assert run.result.column("text").error and run.result.column("snr_db").error
    paths = save_reports(run, tmp_path, "w")
    assert load_result(paths.json) == run.result
    # The page says which columns have no result (they have no Evidently widget of their own).
    html = paths.html.read_text(encoding="utf-8")
    assert "No result for column 'text'" in html and "No result for column 'snr_db'" in html


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=20000", *args],
        capture_output=True, text=True, timeout=90, check=True,
    )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_html_report_renders_every_feature_in_chromium(
    shifted_run: DriftRun, tmp_path: Path
) -> None:
    paths = save_reports(shifted_run, tmp_path, "window")
    html = paths.html.read_text(encoding="utf-8")
    # Before JS runs the page is a shell: column names live only inside <script> data.
    assert not [f for f in FEATURES if f"'{f}'" in _visible(html)]

    png = tmp_path / "report.png"
    # One browser run: the DOM after JS ran, and a screenshot of the same page.
    dom = _chromium([f"--screenshot={png}", "--window-size=1280,1600", "--dump-dom",
                     paths.html.as_uri()], tmp_path).stdout
    visible = _visible(dom)
    # The preset's table has a row per numeric and categorical feature (all on one page); the
    # transcript text has its own widget.
    missing = [f for f in FEATURES if f != "text" and not re.search(rf">\s*{f}\s*<", visible)]
    assert not missing, f"not rendered: {missing}"
    assert "Drift in column 'text'" in visible
    assert "Window drifted" in visible  # our summary on top

    from PIL import Image

    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1280, 1600)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "screenshot is (nearly) blank"


def _visible(html: str) -> str:
    return re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S | re.I)

