"""retrain/dataset.py: validation drops (each planted fault counted under its reason), grouped and
stratified splits, contamination against the golden set, replay, the written manifests and the
data report. Real synthetic speech (espeak-ng and flite), no model, no Ray."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from asrops.audio import SAMPLE_RATE, audio_to_wav_bytes, decode_audio
from asrops.clip_manifest import read_rows as load_rows
from asrops.feedback import FeedbackRecord, FeedbackStore
from asrops.prodlog import flac_bytes
from asrops.registry.store import LocalStore
from asrops.retrain.dataset import (
    DROP_REASONS,
    DataReport,
    Example,
    examples_from_feedback,
    examples_from_manifest,
    fingerprint,
    split,
    validate,
)
from asrops.retrain.dataset import (
    build_dataset as build,
)
from asrops.settings import DatasetSettings
from asrops.synth import SynthSpec, generate, split_templates

needs_tts = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None,
    reason="espeak-ng and flite needed (scripts/setup.sh installs them)",
)
SETTINGS = DatasetSettings(seed=0, replay_share=0.2)  # the 12-clip replay pool covers it
PARAGRAPH = (
    "The committee reviewed the quarterly figures at length and concluded that the regional "
    "offices had exceeded their targets, although several members warned that the growth in "
    "operating costs would need careful attention over the coming year if margins were to hold, "
    "and the chair asked for a detailed plan before the next meeting in the autumn."
)
# planted id -> the reason it must be dropped for
PLANTED = {
    "bad-mismatch": "implausible_chars_per_s",
    "bad-silent": "silent",
    "bad-clipped": "clipping",
    "bad-noisy": "low_snr",
    "bad-empty": "empty_transcript",
    "bad-dup-audio": "duplicate_audio",
    "bad-dup-text": "duplicate_transcript",
    "bad-golden": "contamination",
    "bad-short": "duration_out_of_bounds",
    "bad-notaudio": "undecodable",
}


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A new set (40 clips, 2 voices x 2 domains, training templates) with every kind of bad
    clip planted at the end of its manifest; a golden set (held-out templates) one of whose clips
    is planted in the new set; a replay set from another domain."""
    root = tmp_path_factory.mktemp("retrain-dataset")
    train_templates, heldout_templates = split_templates(0.25, seed=0)
    common = {"voices": ["en-us", "kal"], "template_ids": train_templates}
    new = generate(SynthSpec(n=40, domains=["commands", "general"], seed=3, **common), root / "new")
    golden = generate(
        SynthSpec(n=6, voices=["en-us"], domains=["commands", "general"], seed=4,
                  template_ids=heldout_templates),
        root / "golden",
    )  # fmt: skip
    replay = generate(SynthSpec(n=12, domains=["numbers"], seed=5, **common), root / "replay")
    rows = [{**r, "audio": str(new.parent / r["audio"])} for r in load_rows(new)]
    golden_rows = load_rows(golden)
    bad = root / "bad"
    bad.mkdir()
    planted: list[dict] = []

    def plant(id_: str, audio: np.ndarray | bytes, text: str, like: dict, suffix: str = ".wav") -> None:
        path = bad / f"{id_}{suffix}"
        path.write_bytes(audio if isinstance(audio, bytes) else audio_to_wav_bytes(audio))
        planted.append({**like, "id": id_, "audio": str(path), "text": text})

    rng = np.random.default_rng(0)
    x = [decode_audio(r["audio"]).samples for r in rows[:8]]
    plant("bad-mismatch", 0.8 * x[1], PARAGRAPH, rows[1])
    plant("bad-silent", np.zeros(2 * SAMPLE_RATE, np.float32), rows[2]["text"], rows[2])
    plant("bad-clipped", np.clip(20 * x[2], -1, 1), rows[2]["text"] + " again", rows[2])
    noisy = x[3] + 3 * np.std(x[3]) * rng.standard_normal(x[3].size)
    plant("bad-noisy", 0.9 * noisy / np.max(np.abs(noisy)), rows[3]["text"] + " again", rows[3])
    plant("bad-empty", 0.7 * x[4], "", rows[4])
    buf = bad / "flac.tmp"  # the same samples as rows[5], but FLAC: same decoded audio
    sf.write(buf, x[5], SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    plant("bad-dup-audio", buf.read_bytes(), rows[5]["text"] + " copy", rows[5], ".flac")
    plant("bad-dup-text", 0.7 * x[6], rows[6]["text"], rows[6])
    g = golden_rows[0]
    plant("bad-golden", (golden.parent / g["audio"]).read_bytes(), g["text"], g)
    plant("bad-short", x[7][: SAMPLE_RATE // 5], "Hi.", rows[7])
    plant("bad-notaudio", b"this is not audio at all, just some text in a file\n" * 20, "Hello there.", rows[0])

    planted_manifest = root / "planted.jsonl"
    planted_manifest.write_text("".join(json.dumps(r) + "\n" for r in rows + planted))
    return {
        "root": root,
        "good_ids": {Path(r["audio"]).stem for r in rows},
        "new": examples_from_manifest(planted_manifest, "curated"),
        "golden": examples_from_manifest(golden, "golden"),
        "replay": examples_from_manifest(replay, "replay"),
    }


@pytest.fixture(scope="module")
def built(data):
    return build(data["new"], data["golden"], data["replay"], SETTINGS, data["root"] / "out")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- validation --------------------------------------------------------------------------
@needs_tts
def test_every_planted_fault_is_dropped_under_its_reason_and_good_clips_survive(data, built):
    drops = built.report.drops
    for id_, reason in PLANTED.items():
        assert id_ in drops.examples[reason], (id_, reason, drops.examples)
    assert drops.counts == {r: list(PLANTED.values()).count(r) for r in DROP_REASONS}
    assert drops.by_source == {"curated": drops.counts}

    rows = [r for name in ("train", "validation", "test") for r in _read(getattr(built, name))]
    new_ids = {r["id"] for r in rows if r["source"] == "curated"}
    assert new_ids == data["good_ids"]  # all 40 good clips, none of the planted ones
    assert built.report.counts_in == {"curated": 50, "replay": 12, "golden": 6}


@needs_tts
def test_validate_fills_in_duration_and_hash_and_duplicates_keep_the_first(data):
    first, dup = [e for e in data["new"] if e.id in ("s3-00005", "bad-dup-audio")]
    kept, drops = validate([dup, first], SETTINGS)  # order decides which copy stays
    assert [e.id for e in kept] == ["bad-dup-audio"] and drops.counts["duplicate_audio"] == 1
    assert kept[0].audio_sha256 == fingerprint([first])[0].audio_sha256  # FLAC == WAV decoded
    assert kept[0].duration_s == pytest.approx(first.duration_s, abs=0.01)
    strict = SETTINGS.model_copy(update={"min_snr_db": 200.0})
    assert validate([first], strict)[1].counts["low_snr"] == 1  # thresholds come from settings


# --- splits ------------------------------------------------------------------------------
@needs_tts
def test_splits_are_disjoint_in_audio_and_group_and_cover_every_slice(data, built):
    splits = {name: _read(getattr(built, name)) for name in ("train", "validation", "test")}
    hashes = {
        name: {e.audio_sha256 for e in fingerprint(examples_from_manifest(getattr(built, name), "curated"))}
        for name in splits
    }
    groups = {name: {r["group"] for r in rows} for name, rows in splits.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not hashes[a] & hashes[b], (a, b)
        assert not groups[a] & groups[b], (a, b)
    golden_hashes = {e.audio_sha256 for e in fingerprint(data["golden"])}
    assert not hashes["train"] & golden_hashes

    new_rows = {name: [r for r in rows if r["source"] == "curated"] for name, rows in splits.items()}
    strata = Counter((r["voice"], r["domain"]) for rows in new_rows.values() for r in rows)
    assert len(strata) == 4 and min(strata.values()) >= 8
    for name in ("train", "test"):
        present = {(r["voice"], r["domain"]) for r in new_rows[name]}
        assert present == set(strata), name
    n_new = sum(strata.values())
    assert abs(len(splits["test"]) - SETTINGS.test_share * n_new) <= 4
    audio = [Path(r["audio"]) for rows in splits.values() for r in rows]
    assert all(a.is_absolute() and a.exists() for a in audio)


def test_split_on_many_groups_keeps_groups_whole_and_shares_per_stratum():
    rng = np.random.default_rng(1)
    examples, group = [], 0
    for stratum in ("a", "b", "c", "d"):
        for _ in range(60):
            group += int(rng.random() < 0.6)
            examples.append(Example(id=f"{len(examples)}", audio="/x.wav", text="t", source="curated",
                                    slices={"accent": stratum}, group=f"g{group}"))  # fmt: skip
    examples.append(Example(id="lone", audio="/x.wav", text="t", source="curated", slices={"accent": "rare"}))
    settings = DatasetSettings(slice_fields=["accent"], validation_share=0.15, test_share=0.2)
    s = split(examples, settings)
    assert sorted(e.id for _, part in s.items() for e in part) == sorted(e.id for e in examples)
    owner = {}
    for name, part in s.items():
        for e in part:
            assert owner.setdefault(e.group, name) == name, f"group {e.group} in two splits"
    for stratum in "abcd":
        n = {name: sum(e.slices["accent"] == stratum for e in part) for name, part in s.items()}
        assert abs(n["test"] - 12) <= 3 and abs(n["validation"] - 9) <= 3, (stratum, n)
    assert [e.id for e in s.train if e.slices["accent"] == "rare"] == ["lone"]  # tiny strata train
    assert split(examples, settings) == s  # seeded


# --- replay and report -------------------------------------------------------------------
@needs_tts
def test_replay_is_drawn_from_replay_only_at_its_share(data, built):
    train = _read(built.train)
    new_train = [r for r in train if r["source"] == "curated"]
    replayed = [r for r in train if r["source"] == "replay"]
    assert len(replayed) == round(SETTINGS.replay_share * len(new_train)) == built.report.replay.drawn
    assert {r["voice"] for r in replayed} == {"en-us", "kal"}  # stratified: both voices
    assert not any(r["source"] == "golden" for r in train)
    held_out = _read(built.validation) + _read(built.test)
    assert not any(r["source"] == "replay" for r in held_out)
    # Half the replay pool (12 clips, none dropped) is kept apart as the retention set: never trained on.
    retention = _read(built.retention)
    assert len(retention) == 6 == built.report.replay.retention
    assert {r["source"] for r in retention} == {"replay"}
    assert not {r["id"] for r in retention} & {r["id"] for r in train}

    alone = build(data["new"], data["golden"], [], SETTINGS, data["root"] / "no-replay")
    assert alone.report.replay.drawn == 0 and "no replay" in alone.report.replay.note
    assert "no replay" in alone.report_md.read_text()


@needs_tts
def test_retention_only_examples_are_validated_and_never_in_the_golden_set(data):
    """Retention-only manifests (known-good data, evaluation only) join the retention set, minus
    what the golden set holds: a clip that judges the result must not also pick the checkpoint."""
    as_retention = [e.model_copy(update={"source": "retention"}) for e in [*data["replay"], data["golden"][0]]]
    built = build(data["new"], data["golden"], [], SETTINGS, data["root"] / "retention-only", as_retention)
    retention = _read(built.retention)
    assert {r["id"] for r in retention} == {e.id for e in data["replay"]}
    assert built.report.drops.by_source["retention"]["contamination"] == 1
    assert not any(r["source"] == "retention" for r in _read(built.train))


@needs_tts
def test_acoustic_clips_are_trained_on_only_and_never_what_is_judged(data, tmp_path):
    """The drift's acoustics over broad text: validated, trained on, never held out (held-out
    data is the corrections'), counted for the replay share, and a judged clip among them dropped."""
    broad = generate(SynthSpec(n=8, voices=["en-us", "kal"], domains=["commands", "general"], seed=6,
                               text="broad"), tmp_path / "acoustic")
    acoustic = examples_from_manifest(broad, "acoustic")
    judged = data["golden"][0].model_copy(update={"id": "acoustic-golden", "source": "acoustic"})
    built = build(data["new"], data["golden"], data["replay"], SETTINGS, tmp_path / "out", acoustic=[*acoustic, judged])
    train = _read(built.train)
    assert {r["id"] for r in train if r["source"] == "acoustic"} == {e.id for e in acoustic}
    assert not [r for r in _read(built.validation) + _read(built.test) if r["source"] == "acoustic"]
    assert built.report.counts_in["acoustic"] == 9
    assert built.report.drops.by_source["acoustic"]["contamination"] == 1
    learnt = [r for r in train if r["source"] in ("curated", "acoustic")]
    assert built.report.replay.requested == round(SETTINGS.replay_share * len(learnt))


@needs_tts
def test_report_files_say_what_was_dropped_and_round_trip(built):
    assert DataReport.model_validate_json(built.report_json.read_text()) == built.report
    md = built.report_md.read_text()
    for reason in DROP_REASONS:
        assert f"| {reason} |" in md, reason
    for id_ in PLANTED:
        assert id_ in md, id_
    summary = built.report.splits
    assert summary["train"].by_slice["voice"].keys() == {"en-us", "kal"}
    assert summary["test"].by_slice["domain"].keys() == {"commands", "general"}
    assert built.report.contamination == 1
    assert "### Slice `voice`" in md and "## Replay" in md and "## Contamination" in md


# --- feedback ----------------------------------------------------------------------------
@needs_tts
def test_feedback_with_audio_becomes_examples_and_missing_audio_is_counted(data, tmp_path):
    store = LocalStore(tmp_path / "store")
    feedback = FeedbackStore(store)
    now = datetime.now(UTC)
    clip = next(e for e in data["new"] if e.id == "s3-00000")
    samples = decode_audio(clip.audio).samples
    store.write_bytes("audio/a.flac", flac_bytes(samples))

    def record(rid: str, key: str | None, tags: dict) -> FeedbackRecord:
        return FeedbackRecord(
            request_id=rid, received_at=now, model_version="v1", route="stable", hypothesis="x",
            reference=clip.text, tags=tags, audio_key=key, word_errors=1, reference_words=5,
        )  # fmt: skip

    feedback.save(record("req/1", "audio/a.flac", {"accent": "en-us", "device": "phone"}))
    feedback.save(record("req-2", None, {}))  # audio not kept: not an example
    feedback.save(record("req-3", "audio/gone.flac", {}))
    examples = examples_from_feedback(store, now - timedelta(hours=1), now + timedelta(hours=1), tmp_path / "ds")
    by_id = {e.id: e for e in examples}
    assert set(by_id) == {"req/1", "req-3"}
    first = by_id["req/1"]
    assert first.source == "feedback" and first.text == clip.text
    assert first.slices == {"accent": "en-us"}  # only slice fields
    assert Path(first.audio).parent == (tmp_path / "ds" / "audio").resolve()
    kept, drops = validate(examples, SETTINGS)
    assert [e.id for e in kept] == ["req/1"] and drops.examples["undecodable"] == ["req-3"]
    assert kept[0].audio_sha256 == fingerprint([clip])[0].audio_sha256  # FLAC round trip


def test_no_client_supplies_more_than_its_share_of_the_corrections():
    from asrops.retrain.dataset import cap_per_client

    now = datetime.now(UTC)
    rows = [{"request_id": f"m-{i}", "client": "mallory", "received_at": now + timedelta(seconds=i)}
            for i in range(90)]
    rows += [{"request_id": f"{c}-{i}", "client": c, "received_at": now} for c in "ab" for i in range(5)]
    kept = cap_per_client(pd.DataFrame(rows), share=0.5)
    by = kept["client"].value_counts()
    assert by["mallory"] == 50 and by["a"] == 5 and by["b"] == 5  # 50 % of 100, the newest of its own
    assert set(kept[kept.client == "mallory"].request_id) == {f"m-{i}" for i in range(40, 90)}
    # One client alone (anonymous mode): nothing to balance against.
    alone = pd.DataFrame(rows[:90])
    assert len(cap_per_client(alone, share=0.5)) == 90
