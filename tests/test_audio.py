"""decode_audio: every supported format reaches 16 kHz mono float32 with the right content, and
every malformed input ends as the right AudioError with a usable message.

Fixtures are generated here with numpy + soundfile + PyAV's encoders (no ffmpeg/sox binaries)."""

from __future__ import annotations

import io
import json
import struct

import av
import numpy as np
import pytest
import soundfile as sf

from asrops.audio import QUICK_DECODE_MAX_BYTES, SAMPLE_RATE, audio_to_wav_bytes, decode_audio, decode_quick, sniff
from asrops.errors import (
    AudioTooLargeError,
    AudioTooLongError,
    EmptyAudioError,
    InvalidAudioError,
    UndecodableAudioError,
)
from asrops.settings import AudioSettings
from tests.conftest import SPEECH_DIR

TONE_HZ = 1000.0
TONE_RMS = 0.5 / np.sqrt(2)  # a 0.5-amplitude sine


# --- fixture builders --------------------------------------------------------------------
def tone(rate: int, channels: int = 1, seconds: float = 1.0, hz: float = TONE_HZ) -> np.ndarray:
    """(frames, channels) float32: the same 0.5-amplitude sine on every channel."""
    t = np.arange(int(round(rate * seconds))) / rate
    x = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1)


def sf_encode(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def av_encode(x: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """Encode (frames, channels) float samples with PyAV's bundled FFmpeg encoders."""
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[x.shape[1]]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        for i in range(0, len(x), 1024):
            chunk = np.ascontiguousarray(x[i : i + 1024].T)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def wav_header(rate: int, channels: int, bits: int, frames: int) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
    return (
        b"RIFF" + struct.pack("<I", 36 + frames * block) + b"WAVE"
        + b"fmt " + fmt + b"data" + struct.pack("<I", frames * block)
    )  # fmt: skip


def dominant_hz(y: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spectrum) * rate / len(y))


def rms(y: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))


def assert_tone(d, seconds: float, *, lossless: bool) -> None:
    assert d.samples.dtype == np.float32 and d.samples.ndim == 1
    assert abs(d.duration_s - seconds) <= 0.050, d.duration_s
    assert d.duration_s == pytest.approx(d.samples.size / SAMPLE_RATE)
    assert np.abs(d.samples).max() <= 1.0
    assert dominant_hz(d.samples) == pytest.approx(TONE_HZ, abs=3)
    if lossless:  # identical channels: a normalised down-mix keeps the level
        assert rms(d.samples) == pytest.approx(TONE_RMS, rel=0.03)
    else:
        assert 0.6 * TONE_RMS < rms(d.samples) < 1.5 * TONE_RMS


# --- formats -----------------------------------------------------------------------------
SF_FORMATS = [
    ("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"), ("WAV", "FLOAT"),
    ("FLAC", "PCM_16"), ("FLAC", "PCM_24"), ("OGG", "VORBIS"),
]  # fmt: skip


@pytest.mark.parametrize("channels", [1, 2, 6])
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("fmt,subtype", SF_FORMATS)
def test_soundfile_formats_decode_to_16k_mono(fmt, subtype, rate, channels):
    data = sf_encode(tone(rate, channels), rate, fmt, subtype)
    d = decode_audio(data)
    assert_tone(d, 1.0, lossless=subtype != "VORBIS" and subtype != "PCM_U8")
    assert (d.original_sample_rate, d.original_channels) == (rate, channels)
    assert d.container == {"WAV": "wav", "FLAC": "flac", "OGG": "ogg"}[fmt]


AV_CASES = [
    *[("mp3", "libmp3lame", r, c) for r in (8000, 22050, 44100, 48000) for c in (1, 2)],
    *[("ogg", "libopus", r, c) for r, c in ((48000, 1), (48000, 2), (48000, 6), (16000, 1))],
    *[("webm", "libopus", 48000, c) for c in (1, 2)],
    *[("ipod", "aac", r, c) for r in (22050, 44100, 48000) for c in (1, 2, 6)],
]


@pytest.mark.parametrize("container,codec,rate,channels", AV_CASES)
def test_pyav_encoded_formats_decode_to_16k_mono(container, codec, rate, channels):
    data = av_encode(tone(rate, channels), rate, container, codec)
    d = decode_audio(data)
    assert_tone(d, 1.0, lossless=False)
    assert d.original_channels == channels
    # Opus always decodes at 48 kHz, whatever rate went into the encoder.
    assert d.original_sample_rate == (48000 if codec == "libopus" else rate)
    assert d.codec == {"libmp3lame": "mp3float", "libopus": "opus", "aac": "aac"}[codec]


def test_plain_16k_mono_wav_reads_as_ffmpeg_decodes_it(monkeypatch):
    """The 16-kHz mono 16-bit WAV shortcut (libsndfile) gives FFmpeg's samples to the bit, and a
    header that claims more audio than the upload holds is read for what it holds."""
    import asrops.audio as audio

    rng = np.random.default_rng(3)
    data = sf_encode(np.clip(rng.normal(0, 0.3, 3 * SAMPLE_RATE), -1, 1), SAMPLE_RATE, "WAV", "PCM_16")
    fast = decode_audio(data)
    at = data.index(b"data")
    lying = data[: at + 4] + struct.pack("<I", 0x7FFFFFF0) + data[at + 8 :]
    fast_lying = decode_audio(lying, AudioSettings(max_duration_s=5))
    with monkeypatch.context() as m:
        m.setattr(audio, "_decode_plain_wav", lambda data, limits: None)
        slow = decode_audio(data)
    assert np.array_equal(fast.samples, slow.samples) and fast.samples.dtype == np.float32
    assert (fast.duration_s, fast.original_sample_rate, fast.original_channels, fast.codec, fast.container) == (
        slow.duration_s, slow.original_sample_rate, slow.original_channels, slow.codec, slow.container)
    assert np.array_equal(fast_lying.samples, slow.samples)
    with pytest.raises(AudioTooLongError, match=r"Audio is 3\.0 s long; the limit is 2 s"):
        decode_audio(data, AudioSettings(max_duration_s=2))


def test_quick_decode_reads_small_plain_wavs_only_and_keeps_the_limits():
    """What a server decodes on its event loop: a small 16-kHz mono 16-bit WAV, to the same samples
    as decode_audio; anything that needs more (resampling, another codec, a large file) is left to
    decode_audio (None), and an upload over the limits gets the same error as from decode_audio."""
    rng = np.random.default_rng(5)
    speech_like = np.clip(rng.normal(0, 0.3, 2 * SAMPLE_RATE), -1, 1)
    data = sf_encode(speech_like, SAMPLE_RATE, "WAV", "PCM_16")
    quick = decode_quick(data, AudioSettings())
    assert quick is not None and np.array_equal(quick.samples, decode_audio(data).samples)
    long_wav = sf_encode(np.zeros(QUICK_DECODE_MAX_BYTES // 2 + SAMPLE_RATE), SAMPLE_RATE, "WAV", "PCM_16")
    for needs_more in (
        long_wav,
        sf_encode(tone(44100), 44100, "WAV", "PCM_16"),
        sf_encode(tone(SAMPLE_RATE, channels=2), SAMPLE_RATE, "WAV", "PCM_16"),
        sf_encode(tone(SAMPLE_RATE), SAMPLE_RATE, "WAV", "FLOAT"),
        sf_encode(tone(SAMPLE_RATE), SAMPLE_RATE, "FLAC", "PCM_16"),
        b"",
    ):
        assert decode_quick(needs_more, AudioSettings()) is None
    assert decode_audio(long_wav).duration_s > QUICK_DECODE_MAX_BYTES / 2 / SAMPLE_RATE
    with pytest.raises(AudioTooLongError, match=r"Audio is 2\.0 s long; the limit is 1 s"):
        decode_quick(data, AudioSettings(max_duration_s=1))
    small_limit = AudioSettings(max_upload_bytes=len(data) - 1)
    assert decode_quick(data, small_limit) is None
    with pytest.raises(AudioTooLargeError):
        decode_audio(data, small_limit)
    with pytest.raises(EmptyAudioError):
        decode_quick(sf_encode(np.zeros(0), SAMPLE_RATE, "WAV", "PCM_16"), AudioSettings())


def test_chirp_is_resampled_with_anti_aliasing():
    """A 48 kHz chirp 200 Hz -> 12 kHz: below 8 kHz it is tracked in time; above Nyquist it
    must vanish rather than fold back as aliases (proves a real low-pass resampler)."""
    rate, f0, f1 = 48000, 200.0, 12000.0
    t = np.arange(rate) / rate
    x = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / 2 * t**2))
    d = decode_audio(sf_encode(x.astype(np.float32), rate, "WAV", "PCM_16"))
    y = d.samples
    assert y.size == SAMPLE_RATE
    for centre in (0.1, 0.3, 0.5):  # instantaneous frequency f0 + (f1 - f0) * t
        window = y[int((centre - 0.025) * SAMPLE_RATE) : int((centre + 0.025) * SAMPLE_RATE)]
        assert dominant_hz(window) == pytest.approx(f0 + (f1 - f0) * centre, abs=350)
    passband = y[int(0.1 * SAMPLE_RATE) : int(0.5 * SAMPLE_RATE)]
    above_nyquist = y[int(0.75 * SAMPLE_RATE) :]  # 9.1 kHz and up
    assert rms(passband) == pytest.approx(TONE_RMS, rel=0.05)
    assert rms(above_nyquist) < 0.01 * rms(passband)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_downmix_averages_channels(fmt):
    """1 kHz left, 3 kHz right: both survive at half level (not channel 0 only, not clipped)."""
    rate = 44100
    x = np.concatenate([tone(rate, hz=1000.0), tone(rate, hz=3000.0)], axis=1)
    y = decode_audio(sf_encode(x, rate, fmt, "PCM_16")).samples
    spectrum = np.abs(np.fft.rfft(y)) / (len(y) / 2)  # 1-Hz bins, amplitude scale
    assert spectrum[1000] == pytest.approx(0.25, abs=0.01)
    assert spectrum[3000] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("channels", [3, 17, 32])
def test_wav_without_channel_layout_decodes(channels):
    """WAVs with odd channel counts carry no layout; FFmpeg's down-mix fails or crashes on
    some (17, 32), so decode_audio averages them itself."""
    d = decode_audio(sf_encode(tone(22050, channels), 22050, "WAV", "PCM_16"), AudioSettings())
    assert_tone(d, 1.0, lossless=True)
    assert d.original_channels == channels


def test_path_input_and_wav_round_trip(tmp_path):
    x = tone(SAMPLE_RATE)[:, 0]
    path = tmp_path / "tone.wav"
    path.write_bytes(audio_to_wav_bytes(x))
    for source in (path, str(path), path.read_bytes()):
        d = decode_audio(source)
        assert d.samples.size == x.size
        assert np.abs(d.samples - x).max() < 1e-4  # 16 kHz mono PCM_16: only quantisation
    info = sf.info(io.BytesIO(audio_to_wav_bytes(x)))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")


def test_sniff_recognises_audio_containers():
    x, rate = tone(48000, seconds=0.1), 48000
    assert sniff(sf_encode(x, rate, "WAV", "PCM_16")) == "WAV audio"
    assert sniff(sf_encode(x, rate, "FLAC", "PCM_16")) == "FLAC audio"
    assert sniff(sf_encode(x, rate, "OGG", "VORBIS")) == "Ogg audio"
    assert sniff(av_encode(x, rate, "mp3", "libmp3lame")) == "MP3 audio"  # ID3 tag first
    assert sniff(av_encode(x, rate, "webm", "libopus")) == "WebM/Matroska"
    assert sniff(av_encode(x, rate, "ipod", "aac")) == "MP4/M4A"
    assert sniff(b"NIST_1A\n   1024\n" + b" " * 600) == "NIST SPHERE audio"  # not "text"


# --- malformed input ---------------------------------------------------------------------
def test_zero_bytes_is_empty():
    with pytest.raises(EmptyAudioError, match="empty"):
        decode_audio(b"")


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(17), "PNG image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(64), "JPEG image"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(64), "PDF document"),
        (b'{"text": "hello world", "language": "en"}', "JSON text"),
        (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "HTML page"),
        (b"hello, this is not audio\n" * 20, "plain text"),
        (np.random.default_rng(0).bytes(64_000), "unrecognised binary data"),
    ],
    ids=["png", "jpeg", "pdf", "json", "html", "text", "random"],
)
def test_non_audio_is_undecodable_with_a_helpful_message(data, kind):
    assert sniff(data) == kind
    with pytest.raises(UndecodableAudioError) as err:
        decode_audio(data)
    message = str(err.value)
    assert f"it looks like: {kind}" in message
    assert "Send wav, flac, mp3, ogg/opus, webm or m4a" in message


def test_truncated_wav():
    data = sf_encode(tone(SAMPLE_RATE), SAMPLE_RATE, "WAV", "PCM_16")
    assert len(data) == 44 + 2 * SAMPLE_RATE
    with pytest.raises(EmptyAudioError, match="no audio samples"):
        decode_audio(data[:44])  # a complete header, no data
    with pytest.raises(UndecodableAudioError, match="WAV audio"):
        decode_audio(data[:22])  # half a header
    # Cut mid-data: FFmpeg decodes what is there (the header's length is not trusted).
    assert decode_audio(data[: 44 + SAMPLE_RATE]).duration_s == pytest.approx(0.5, abs=0.001)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_wav_is_invalid(bad):
    x = tone(SAMPLE_RATE)[:, 0]
    x[1234] = bad
    with pytest.raises(InvalidAudioError, match="NaN or infinite"):
        decode_audio(sf_encode(x, SAMPLE_RATE, "WAV", "FLOAT"))


def test_absurd_sample_rate_is_invalid():
    # FFmpeg accepts the header; the 384 kHz default limit rejects it before decoding.
    data = wav_header(1_000_000, 1, 16, 16_000) + bytes(32_000)
    with pytest.raises(InvalidAudioError, match="rate is 1000000 Hz; the limit is 384000 Hz"):
        decode_audio(data, AudioSettings())
    assert decode_audio(data).original_sample_rate == 1_000_000  # no limits: it is just audio


def test_too_many_channels_is_invalid():
    data = sf_encode(np.zeros((1600, 40), np.float32), SAMPLE_RATE, "WAV", "PCM_16")
    with pytest.raises(InvalidAudioError, match="40 channels; the limit is 32"):
        decode_audio(data, AudioSettings())


def test_file_without_audio_track_is_empty():
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(EmptyAudioError, match=r"no audio track \(it contains: video\)"):
        decode_audio(buf.getvalue())


def test_too_long_stops_decoding_early(monkeypatch):
    """A 120 s FLAC against a 2 s limit: rejected after decoding about 2 s, not all 120."""
    data = sf_encode(tone(8000, seconds=120.0), 8000, "FLAC", "PCM_16")
    seen = {"seconds": 0.0}
    real = av.AudioResampler

    class CountingResampler:
        def __init__(self, **kwargs):
            self._inner = real(**kwargs)

        def resample(self, frame):
            if frame is not None:
                seen["seconds"] += frame.samples / frame.sample_rate
            return self._inner.resample(frame)

    monkeypatch.setattr(av, "AudioResampler", CountingResampler)
    limits = AudioSettings(max_duration_s=2.0)
    with pytest.raises(AudioTooLongError) as err:
        decode_audio(data, limits)
    assert str(err.value) == "Audio is 120.0 s long; the limit is 2 s. Split it into shorter files."
    assert seen["seconds"] < 2.0

    three_s = sf_encode(tone(SAMPLE_RATE, seconds=3.0), SAMPLE_RATE, "WAV", "PCM_16")
    with pytest.raises(AudioTooLongError, match="limit is 2 s"):
        decode_audio(three_s, limits)
    assert decode_audio(three_s, AudioSettings(max_duration_s=3.0)).duration_s == 3.0


def test_too_large_is_checked_before_decoding(tmp_path):
    limits = AudioSettings(max_upload_bytes=1000)
    wav = sf_encode(tone(8000, seconds=0.2), 8000, "WAV", "PCM_16")
    assert len(wav) > 1000
    for data in (wav, b"\x89PNG\r\n\x1a\n" + bytes(2000)):  # even garbage: size comes first
        with pytest.raises(AudioTooLargeError, match=r"KiB; the limit is 1000 bytes\. Compress it"):
            decode_audio(data, limits)
    path = tmp_path / "big.wav"
    path.write_bytes(wav)
    with pytest.raises(AudioTooLargeError):
        decode_audio(path, limits)
    assert decode_audio(wav[:1000], limits).duration_s > 0  # at the limit is fine


# --- real speech -------------------------------------------------------------------------
def _speech_rows() -> list[dict]:
    manifest = SPEECH_DIR / "manifest.jsonl"
    if not manifest.exists():
        pytest.skip(f"../shared/data/speech not found ({SPEECH_DIR}); real-speech checks skipped")
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def _pick(rows, predicate) -> dict:
    return next(r for r in rows if predicate(r))


@pytest.mark.speech
@pytest.mark.parametrize(
    "kind",
    ["wav", "flac", "ogg", "mp3", "stereo-flac", "stereo-mp3", "wav-22k"],
)
def test_real_speech_files(kind):
    rows = _speech_rows()
    predicates = {
        "wav": lambda r: r["audio"].endswith(".wav") and r["sample_rate"] == 16000,
        "wav-22k": lambda r: r["audio"].endswith(".wav") and r["sample_rate"] == 22050,
        "flac": lambda r: r["audio"].endswith(".flac") and r["channels"] == 1,
        "ogg": lambda r: r["audio"].endswith(".ogg"),
        "mp3": lambda r: r["audio"].endswith(".mp3") and r["channels"] == 1,
        "stereo-flac": lambda r: r["audio"].endswith(".flac") and r["channels"] == 2,
        "stereo-mp3": lambda r: r["audio"].endswith(".mp3") and r["channels"] == 2,
    }
    row = _pick(rows, predicates[kind])
    d = decode_audio(SPEECH_DIR / row["audio"], AudioSettings())
    assert d.duration_s == pytest.approx(row["duration_s"], abs=0.050)
    assert d.original_channels == row["channels"]
    if d.codec != "opus":  # Opus decodes at 48 kHz whatever its input rate was
        assert d.original_sample_rate == row["sample_rate"]
    assert 0.0 < np.abs(d.samples).max() <= 1.0
    if row["channels"] == 1:  # resampling keeps the level the manifest measured
        assert 20 * np.log10(rms(d.samples)) == pytest.approx(row["rms_dbfs"], abs=1.0)


@pytest.mark.speech
def test_real_headerless_raw_is_undecodable():
    rows = _speech_rows()
    row = _pick(rows, lambda r: r["audio"].endswith(".raw"))
    with pytest.raises(UndecodableAudioError, match="unrecognised binary data"):
        decode_audio(SPEECH_DIR / row["audio"])


def test_pcm16_carries_16_bit_audio_exactly_and_clips_the_rest():
    """Audio crosses from the ingress to a replica as 16-bit PCM (asrops/audio_format.py)."""
    from asrops.audio_format import from_pcm16, to_pcm16

    pcm = np.random.default_rng(0).integers(-32768, 32768, 16_000).astype(np.int16)
    samples = from_pcm16(pcm)
    assert samples.dtype == np.float32 and samples.min() >= -1.0 and samples.max() < 1.0
    np.testing.assert_array_equal(to_pcm16(samples), pcm)
    np.testing.assert_array_equal(to_pcm16(np.array([1.5, -1.5, 1.0, -1.0], np.float32)),
                                  np.array([32767, -32768, 32767, -32768], np.int16))
