"""Our engines on real speech: meaning, invariants, long audio, batching, beam search,
prompts, and agreement with faster-whisper on the same original weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from asrops.audio import decode_audio
from asrops.engines import DecodeOptions
from asrops.evaluation import core_english_filter, load_manifest, score
from asrops.textnorm import normalize_english

pytestmark = pytest.mark.slow

KINDS = ("torch", "onnx", "onnx-int8")


def _audio(speech_dir, relpath: str) -> np.ndarray:
    return decode_audio(speech_dir / relpath).samples


@pytest.fixture(scope="module")
def core_clips(speech_dir) -> tuple[list[str], list[np.ndarray]]:
    """The first 40 core English clips: their transcripts and their samples."""
    items = load_manifest(speech_dir / "manifest.jsonl", filter=core_english_filter)[:40]
    return [i.text for i in items], [decode_audio(i.audio).samples for i in items]


@pytest.fixture(scope="module")
def full_window_texts(engines, core_clips):
    """`texts(kind)`: an engine's texts of the core clips over 30-s windows, decoded once per module
    for every test that compares against them. In batches of 8: the same text as one at a time
    (tested above), in half the time."""
    _, audios = core_clips
    decoded: dict[str, list[str]] = {}

    def texts(kind: str) -> list[str]:
        if kind not in decoded:
            engine = engines[kind]
            short, engine.short_windows = engine.short_windows, False
            try:
                decoded[kind] = [t.text for i in range(0, len(audios), 8) for t in engine.transcribe(audios[i : i + 8])]
            finally:
                engine.short_windows = short
        return decoded[kind]

    return texts


@pytest.mark.parametrize("kind", KINDS)
def test_transcribes_jfk_with_sane_segments(engines, speech_dir, kind):
    audio = _audio(speech_dir, "faster_whisper/jfk.flac")
    result = engines[kind].transcribe([audio])[0]
    assert "ask not what your country can do for you" in normalize_english(result.text)
    assert result.duration_s == pytest.approx(11.0, abs=0.05)
    assert result.segments, "no segments"
    previous_end = 0.0
    for seg in result.segments:
        assert previous_end - 0.01 <= seg.start < seg.end <= result.duration_s + 0.5
        assert -1.0 < seg.avg_logprob <= 0.0  # clear speech: confident
        assert 0.0 <= seg.no_speech_prob < 0.2
        assert 0.5 < seg.compression_ratio < 2.4
        previous_end = seg.end


@pytest.mark.parametrize("kind", ("onnx-int8", "torch"))
def test_long_audio_is_windowed_with_monotonic_timestamps(engines, speech_dir, kind):
    """69 s of European Parliament speech: three 30-s windows, timestamps across them."""
    audio = _audio(speech_dir, "cuttledoc_fleurs_voxpopuli/voxpopuli-en-000.ogg")
    result = engines[kind].transcribe([audio])[0]
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts)
    assert result.segments[-1].end > 60.0
    assert len(result.segments) >= 5
    text = normalize_english(result.text)
    assert "ivory" in text and "africa" in text and "guidance" in text


def test_a_clip_is_heard_the_same_whatever_its_batch_mates(engines, speech_dir):
    """Token for token: a quiet clip beside loud ones (the int8 encoder's activation scale is per
    tensor, so a batched encoding would let them coarsen it) and clips of other lengths."""
    rels = ["faster_whisper/jfk.flac", "voiceagent_minilibrispeech/dev-clean-2-0002.wav",
            "cuttledoc_fleurs_voxpopuli/voxpopuli-en-000.ogg"]
    audios = [_audio(speech_dir, r) for r in rels]
    audios.append(audios[1] * (0.02 / np.abs(audios[1]).max()))  # quiet, but above the silence floor
    audios.append(np.clip(audios[0] * 8, -1, 1))  # clipped, loud
    engine = engines["onnx-int8"]
    batched = engine.transcribe(audios)
    single = [engine.transcribe([a])[0] for a in audios]
    for i, (b, s) in enumerate(zip(batched, single, strict=True)):
        assert [seg.tokens for seg in b.segments] == [seg.tokens for seg in s.segments], (i, b.text, s.text)
        assert [(seg.start, seg.end) for seg in b.segments] == [(seg.start, seg.end) for seg in s.segments], i


def _finish_order(engine, audios: list[np.ndarray]):
    """(results, [(audio index, decoder calls so far) per on_done call]) of one batch."""
    calls, finished = [], []
    original = engine.decoder.decode
    engine.decoder.decode = lambda *args, **kw: calls.append(1) or original(*args, **kw)
    try:
        results = engine.transcribe(audios, on_done=lambda i, t: finished.append((i, len(calls), t)))
    finally:
        engine.decoder.decode = original
    assert sorted(i for i, _, _ in finished) == list(range(len(audios)))  # each once
    assert [t for _, _, t in sorted(finished, key=lambda f: f[0])] == results  # what the batch returns
    return results, [(i, n) for i, n, _ in finished], len(calls)


def test_a_short_clip_is_handed_over_before_its_long_batch_mate_is_done(engines, speech_dir):
    """A server answers a clip when its own windows are done, not after a 69-s batch-mate's."""
    long = _audio(speech_dir, "cuttledoc_fleurs_voxpopuli/voxpopuli-en-000.ogg")
    short = _audio(speech_dir, "faster_whisper/jfk.flac")
    _, finished, calls = _finish_order(engines["onnx-int8"], [long, short])
    assert finished[0] == (1, 1), finished  # the short clip first, after the first decoding
    assert finished[1][0] == 0 and calls >= 3


def test_a_clip_needing_no_retry_is_handed_over_before_a_batch_mates_fallback(engines, speech_dir):
    """A clip that loops is decoded again at rising temperatures; its batch-mate, decoded well
    at once, is handed over before those retries (it used to wait for them)."""
    from asrops.audio import audio_to_wav_bytes
    from asrops.synth.effects import add_noise
    from asrops.synth.voices import CATALOGUE, installed_voices, synthesize

    if "en-us" not in installed_voices():
        pytest.skip("espeak-ng's en-us voice is not installed")
    speech = synthesize(CATALOGUE["en-us"], ". ".join(["go go go now"] * 6), 170)
    looping = decode_audio(audio_to_wav_bytes(add_noise(speech, 0.0, np.random.default_rng(0)))).samples
    short = _audio(speech_dir, "faster_whisper/jfk.flac")
    results, finished, calls = _finish_order(engines["onnx-int8"], [looping, short])
    assert any(s.temperature > 0 for s in results[0].segments), results[0].segments  # it was retried
    assert finished[0][0] == 1 and finished[0][1] < calls, (finished, calls)
    assert "ask not what your country can do for you" in normalize_english(results[1].text)


def test_packed_clips_each_get_their_own_words_and_no_others(engines, speech_dir, monkeypatch):
    """Eight short real clips of different sentences and speakers, decoded in shared windows:
    fewer windows than clips, and each answer is its own sentence (as good as decoding it alone)
    with none of the other clips' words in it."""
    items = [i for i in load_manifest(speech_dir / "manifest.jsonl", filter=core_english_filter)
             if 2.0 <= i.duration_s <= 9.0][:8]
    assert len({i.text for i in items}) == 8
    audios = [decode_audio(i.audio).samples for i in items]
    engine = engines["onnx-int8"]
    windows: list[int] = []
    decode = engine.decoder.decode

    def counting(mel, *args, **kwargs):
        windows.append(mel.shape[0])
        return decode(mel, *args, **kwargs)

    monkeypatch.setattr(engine.decoder, "decode", counting)
    packed = engine.transcribe(audios, pack=True)
    assert windows[0] < len(audios) and sum(windows) < len(audios), f"windows decoded: {windows}"
    monkeypatch.setattr(engine.decoder, "decode", decode)
    alone = engine.transcribe(audios)
    for k, (item, mine, own) in enumerate(zip(items, packed, alone, strict=True)):
        assert score([item.text], [mine.text]).wer <= score([item.text], [own.text]).wer + 10.0, (item.text, mine.text)
        words = set(normalize_english(mine.text).split())
        own_words = set(normalize_english(f"{item.text} {own.text}").split())
        others = {w for j, other in enumerate(items) if j != k for w in normalize_english(other.text).split()}
        leaked = {w for w in words - own_words if w in others and len(w) >= 4}
        assert not leaked, (item.text, mine.text, leaked)
        assert all(0.0 <= s.start <= s.end <= mine.duration_s for s in mine.segments)


def test_beam_search_and_no_timestamps_decode_the_same_words(engines, speech_dir):
    audio = _audio(speech_dir, "voiceagent_minilibrispeech/dev-clean-2-0003.wav")
    reference = "IN FACT THE RINGLEADER JOHN REX GAVE ME HIS CONFESSION AND I SENT IT TO THE BISHOP"
    engine = engines["onnx"]
    beam = engine.transcribe([audio], DecodeOptions(beam_size=5))[0]
    plain = engine.transcribe([audio], DecodeOptions(timestamps=False))[0]
    assert score([reference], [beam.text]).wer == 0.0
    assert score([reference], [plain.text]).wer == 0.0
    assert len(plain.segments) == 1 and plain.segments[0].start == 0.0


def test_prompt_biases_vocabulary(engines, speech_dir):
    """Greedy tiny.en hears 'Vergilius'; a prompt with the right spelling fixes it."""
    audio = _audio(speech_dir, "voiceagent_minilibrispeech/dev-clean-2-0001.wav")
    engine = engines["onnx-int8"]
    plain = engine.transcribe([audio])[0].text
    prompted = engine.transcribe([audio], DecodeOptions(prompt="Virgilius, a drachm of blood."))[0].text
    assert "Virgilius" not in plain
    assert "Virgilius" in prompted


def test_silence_yields_no_text_and_speech_after_silence_keeps_its_time(engines, speech_dir):
    silence = np.zeros(16_000 * 5, dtype=np.float32)
    result = engines["onnx-int8"].transcribe([silence])[0]
    assert result.text == "" and result.segments == []
    assert result.duration_s == 5.0
    speech = _audio(speech_dir, "voiceagent_minilibrispeech/dev-clean-2-0002.wav")
    late = engines["onnx-int8"].transcribe([np.concatenate([np.zeros(16_000 * 31, np.float32), speech])])[0]
    assert normalize_english(late.text) == "there was not a single note of gloom"
    assert late.segments[0].start >= 30.0


def test_engines_agree_with_faster_whisper_on_real_speech(core_clips, full_window_texts):
    """On 40 core clips: our torch engine's WER within 2 % (relative) of faster-whisper float32
    on the same original weights; ONNX fp32 and int8 within 0.5 WER points of torch, all over
    30-s windows (short windows are tested below). (The engine benchmark reports the same on all
    245 clips.)"""
    from faster_whisper import WhisperModel

    from asrops.models.ct2_import import embedded_ct2_dir

    refs, audios = core_clips
    fw = WhisperModel(str(embedded_ct2_dir()), device="cpu", compute_type="float32", cpu_threads=2)
    fw_texts = [
        "".join(s.text for s in fw.transcribe(a, beam_size=1, temperature=0.0, language="en",
                                              condition_on_previous_text=False)[0])
        for a in audios
    ]
    wer = {"fw": score(refs, fw_texts).wer}
    for kind in KINDS:
        wer[kind] = score(refs, full_window_texts(kind)).wer
    print(json.dumps(wer))
    assert wer["fw"] < 15.0, wer  # sanity: tiny.en on clean read speech
    assert abs(wer["torch"] - wer["fw"]) <= 0.02 * wer["fw"] + 1e-9, wer
    assert abs(wer["onnx"] - wer["torch"]) <= 0.5, wer
    assert abs(wer["onnx-int8"] - wer["torch"]) <= 0.5, wer


@pytest.mark.parametrize("kind", KINDS)
def test_word_timestamps_cover_the_text_in_order_on_every_engine(engines, speech_dir, kind):
    audio = _audio(speech_dir, "faster_whisper/jfk.flac")
    result = engines[kind].transcribe([audio], DecodeOptions(word_timestamps=True))[0]
    words = result.words
    assert normalize_english(" ".join(w.word for w in words)) == normalize_english(result.text)
    assert all(0 <= w.start <= w.end <= result.duration_s + 0.5 for w in words)
    assert all(a.start <= b.start for a, b in zip(words, words[1:]))
    assert all(0 < w.probability <= 1 for w in words)
    for segment in result.segments:  # each segment's words lie in it (give or take a frame)
        assert all(segment.start - 0.5 <= w.start and w.end <= segment.end + 0.5 for w in segment.words)
    plain = engines[kind].transcribe([audio])[0]
    assert plain.text == result.text and plain.words is None  # the text is the same; words only when asked


def test_word_start_times_match_speech_with_known_word_boundaries(engines):
    """Words synthesised one by one and laid out with known silences (the word-timing benchmark's
    clips): the median start error is at most 100 ms and the 90th percentile at most 250 ms."""
    from asrops.benchmarks.word_timing import TimedWord, errors, make_clips
    from asrops.synth.voices import installed_voices

    if not installed_voices():
        pytest.skip("no speech synthesiser installed")
    errs = []
    for audio, clip in make_clips(6, seed=11):
        words = engines["onnx-int8"].transcribe([audio], DecodeOptions(word_timestamps=True))[0].words
        errs += errors(clip.words, [TimedWord(word=w.word, start=w.start, end=w.end) for w in words])
    starts = np.array([e[0] for e in errs])
    assert len(errs) >= 30
    assert np.median(starts) <= 0.100 and np.percentile(starts, 90) <= 0.250, np.round(np.sort(starts), 3)


def test_segments_are_handed_over_as_each_window_is_decoded(engines, speech_dir):
    """A streamed answer's segments come window by window: the first arrive before the last
    window of a 69-s clip is decoded (the backend's encode calls count the windows so far)."""
    engine = engines["onnx-int8"]
    audio = _audio(speech_dir, "cuttledoc_fleurs_voxpopuli/voxpopuli-en-000.ogg")
    encoded, seen = [], []
    original = engine.backend.encode
    engine.backend.encode = lambda mel: encoded.append(len(mel)) or original(mel)
    try:
        result = engine.transcribe([audio], on_segments=lambda i, segments: seen.append((len(encoded), segments)))[0]
    finally:
        engine.backend.encode = original
    assert [s for _, batch in seen for s in batch] == result.segments
    assert seen[0][0] == 1 and len({windows for windows, _ in seen}) >= 3


def test_an_onnx_engine_transcribes_without_importing_torch_and_with_one_blas_thread(stable_dir, speech_dir):
    """torch (about 230 MB of a process) is only for the torch kind, training and word timing.
    NumPy's OpenBLAS starts with a thread per core; an engine's process keeps one (its
    spin-waiting threads slowed the engine 1.27x on 2 cores)."""
    script = (
        "import json, sys; from pathlib import Path; import numpy, threadpoolctl; "
        "from asrops.audio import decode_audio; from asrops.engines import load_engine; "
        "blas = lambda: [p['num_threads'] for p in threadpoolctl.threadpool_info() "
        "                if p['internal_api'] == 'openblas']; "
        "before = blas(); "
        f"engine = load_engine(Path({str(stable_dir)!r}), 'onnx-int8', 'auto'); "
        f"audio = decode_audio(Path({str(speech_dir / 'faster_whisper/jfk.flac')!r})).samples; "
        "text = engine.transcribe([audio])[0].text; "
        "print(json.dumps({'text': text, 'torch': 'torch' in sys.modules, "
        "'transformers': 'transformers' in sys.modules, 'blas_before': before, 'blas_after': blas()}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
                         env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "ask not what your country can do for you" in normalize_english(result["text"])
    assert not result["torch"] and not result["transformers"], result
    assert result["blas_before"] != [1] or os.cpu_count() == 1, result  # what the engine starts from
    assert result["blas_after"] == [1], result


def _older_version(stable_dir, out, *, two_decoders: bool):
    """A version laid out as an older asrops published it: no int8 decoder, and with
    `two_decoders`, optimum's two fp32 decoder graphs instead of the merged one."""
    from asrops.engines import ENCODERS
    from asrops.models.onnx_export import export_optimum_graphs

    for entry in stable_dir.iterdir():
        if entry.name != "onnx":
            (out / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (out / entry.name).symlink_to(entry)
    (out / ENCODERS["onnx-int8"]).parent.mkdir(parents=True)
    (out / ENCODERS["onnx-int8"]).symlink_to(stable_dir / ENCODERS["onnx-int8"])
    if two_decoders:
        export_optimum_graphs(stable_dir, out / "onnx" / "fp32")
    else:
        (out / "onnx" / "fp32").symlink_to(stable_dir / "onnx" / "fp32")
    return out


def test_versions_of_an_older_asrops_decode_with_their_fp32_decoder(stable_dir, speech_dir, tmp_path):
    """Versions published before the int8 decoder have only the fp32 one, and those published
    before the decoders were merged carry optimum's two graphs (merged in memory when loaded) and
    an encoder that takes 30-s windows only: both serve, with the same segments as today's graphs
    over 30-s windows."""
    from asrops.engines import load_engine
    from asrops.engines.onnx_graphs import DECODER, EXPORTED_DECODERS

    merged = _older_version(stable_dir, tmp_path / "merged", two_decoders=False)
    old = _older_version(stable_dir, tmp_path / "old", two_decoders=True)
    assert {p.name for p in (old / "onnx" / "fp32").glob("decoder*.onnx")} == set(EXPORTED_DECODERS)
    audios = [_audio(speech_dir, r)
              for r in ("faster_whisper/jfk.flac", "cuttledoc_fleurs_voxpopuli/voxpopuli-en-000.ogg")]
    today = load_engine(merged, "onnx", "cpu", 2)
    assert today.short_windows
    today.short_windows = False
    expected = today.transcribe(audios)
    assert "ask not what your country can do for you" in normalize_english(expected[0].text)
    older = load_engine(old, "onnx", "cpu", 2)
    assert not older.short_windows  # optimum's own encoder
    assert older.transcribe(audios) == expected
    assert not (old / "onnx" / "fp32" / DECODER).exists()  # a published version is never written to


def test_short_clips_are_encoded_over_short_windows_and_heard_the_same(engines, core_clips, full_window_texts):
    """A short clip's window is encoded over its audio and a margin of padding, not 30 s, and the
    words come out nearly as they do over 30 s. The first 40 core clips are the ones where short
    windows do worst (+1.3 WER points; -0.2 over all 245): the bound catches a margin that makes
    Whisper loop (1 s: +19 points), not noise."""
    from asrops.engines.engine import context_s

    engine = engines["onnx-int8"]
    refs, audios = core_clips
    frames: list[int] = []
    encode = engine.backend.encode

    def recording(mel):
        frames.extend([mel.shape[-1]] * len(mel))
        return encode(mel)

    engine.backend.encode = recording
    try:
        assert engine.short_windows
        short = [engine.transcribe([a])[0].text for a in audios]
        first_tries = {100 * context_s(len(a)) for a in audios}
        assert first_tries <= set(frames) <= first_tries | {3000}  # doubtful ones again over 30 s
        assert sum(frames) < 0.75 * 3000 * len(frames)
    finally:
        engine.backend.encode = encode
    full = full_window_texts("onnx-int8")
    assert score(refs, short).wer <= score(refs, full).wer + 2.0, list(zip(refs, short, full))


def test_the_int8_decoder_reads_as_the_fp32_one(engines, stable_dir, speech_dir, tmp_path):
    """`onnx-int8` decodes with the version's block-quantised decoder (a third of the fp32 one's
    size) and hears what the fp32 decoder hears."""
    from asrops.engines import DECODERS, load_engine
    from asrops.engines.onnx_graphs import DECODER

    int8, fp32 = (stable_dir / DECODERS[k] / DECODER for k in ("onnx-int8", "onnx"))
    assert int8.stat().st_size < fp32.stat().st_size * 0.5
    fp32_engine = load_engine(_older_version(stable_dir, tmp_path / "fp32", two_decoders=False), "onnx-int8", "cpu", 2)
    for rel in ("faster_whisper/jfk.flac", "cuttledoc_fleurs_voxpopuli/voxpopuli-en-000.ogg",
                "voiceagent_minilibrispeech/dev-clean-2-0002.wav"):
        audio = _audio(speech_dir, rel)
        ours, reference = engines["onnx-int8"].transcribe([audio])[0].text, fp32_engine.transcribe([audio])[0].text
        assert score([reference], [ours]).wer <= 3.0, (rel, reference, ours)


def _pinned_threads() -> set[int]:
    """This process's threads allowed on fewer cores than the process."""
    allowed = os.sched_getaffinity(0)
    pinned = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.sched_getaffinity(int(tid)) != allowed:
                pinned.add(int(tid))
        except OSError:  # exited meanwhile
            continue
    return pinned


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="ONNX Runtime pins its pool threads only with 2+ cores")
def test_an_engine_on_every_core_pins_no_thread_to_one(stable_dir):
    """threads=0 (the replica's default) means one thread per core, and no ONNX Runtime pool
    thread bound to a single core: pinned, it waits whenever another process runs there while
    the other core is free, and every parallel step of the engine waits for it."""
    from asrops.engines import load_engine

    before = _pinned_threads()
    engine = load_engine(stable_dir, "onnx-int8", "cpu", 0, lanes=2)
    engine.transcribe([np.zeros(16000, dtype=np.float32)])
    assert _pinned_threads() - before == set()
    assert engine.backend.decoder.get_session_options().intra_op_num_threads == len(os.sched_getaffinity(0)) // 2


def test_an_onnx_engine_shares_its_cores_among_its_lanes_decoders(stable_dir):
    """A replica's two lanes on 2 cores step their decoders on one thread each (a step split over
    two waits for the slower whenever another process takes a core); a lone caller keeps both."""
    from asrops.engines import engine_lanes, load_engine

    def decoder_threads(lanes: int) -> int:
        engine = load_engine(stable_dir, "onnx-int8", "cpu", 2, lanes=lanes)
        return engine.backend.decoder.get_session_options().intra_op_num_threads

    assert engine_lanes(0, "cpu", "onnx-int8") == 2 and engine_lanes(3, "cpu", "onnx-int8") == 3
    assert decoder_threads(lanes=2) == 1
    assert decoder_threads(lanes=1) == 2
