"""Any audio upload -> 16 kHz mono float32, the only input the engines accept.

Decoding goes through PyAV (FFmpeg's demuxers and decoders, bundled in its wheel), except for
16-kHz mono 16-bit WAV, which needs no conversion and libsndfile reads 25 times faster. Every way an
input can be wrong ends as an `AudioError` subclass with a message the client can act on; no raw
`av` exception leaves this module.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import av
import av.error
import numpy as np
import soundfile as sf

from asrops.audio_format import SAMPLE_RATE
from asrops.errors import (
    AudioTooLargeError,
    AudioTooLongError,
    EmptyAudioError,
    InvalidAudioError,
    UndecodableAudioError,
)
from asrops.settings import AudioSettings

ACCEPTED = "Send wav, flac, mp3, ogg/opus, webm or m4a."

# FFmpeg's default float down-mix is unnormalised (stereo -> 0.707 * (L + R), which clips);
# rematrix_maxval=1 normalises the matrix the way `ffmpeg -ac 1 -f s16le` (Whisper's loader) does.
_RESAMPLER_OPTIONS = {"rematrix_maxval": "1.0"}
# Errors PyAV raises on bad input (FFmpegError subclasses ValueError/OSError in recent PyAV).
_AV_ERRORS = (av.error.FFmpegError, ValueError, OSError, EOFError, RuntimeError)
_INT_FULL_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


@dataclass(frozen=True, eq=False)
class DecodedAudio:
    samples: np.ndarray
    """float32, mono, 16 kHz, values in [-1, 1]."""
    duration_s: float
    original_sample_rate: int
    """As the decoder outputs it (Opus always decodes at 48 kHz)."""
    original_channels: int
    codec: str
    """FFmpeg decoder name: pcm_s16le, flac, mp3float, opus, vorbis, aac, ..."""
    container: str
    """FFmpeg demuxer name: wav, flac, mp3, ogg, "matroska,webm", "mov,mp4,m4a,3gp,3g2,mj2", ..."""


# --- sniffing ----------------------------------------------------------------------------
# (magic at offset 0, description, is audio/video media that FFmpeg should try)
_MAGIC: list[tuple[bytes, str, bool]] = [
    (b"\x89PNG\r\n\x1a\n", "PNG image", False),
    (b"\xff\xd8\xff", "JPEG image", False),
    (b"GIF8", "GIF image", False),
    (b"%PDF", "PDF document", False),
    (b"PK\x03\x04", "ZIP archive (or docx/xlsx)", False),
    (b"\x1f\x8b", "gzip archive", False),
    (b"fLaC", "FLAC audio", True),
    (b"OggS", "Ogg audio", True),
    (b"ID3", "MP3 audio", True),
    (b"\x1a\x45\xdf\xa3", "WebM/Matroska", True),
    (b"#!AMR", "AMR audio", True),
    (b"NIST_1A", "NIST SPHERE audio", True),  # a 1 KiB ASCII header: must win over "text"
]
NON_AUDIO_KINDS = frozenset(d for _, d, media in _MAGIC if not media) | {
    "JSON text",
    "HTML page",
    "XML document",
    "plain text",
}


def sniff(data: bytes) -> str:
    """Say cheaply what `data` looks like, from magic numbers; used in error messages."""
    head = bytes(data[:512])
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "WAV audio"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF audio"
    if head[4:8] == b"ftyp":
        return "MP4/M4A"
    for magic, description, _ in _MAGIC:
        if head.startswith(magic):
            return description
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "MP3/AAC audio"
    if _looks_like_text(head):
        stripped = head.lstrip().lower()
        if stripped[:1] in (b"{", b"["):
            return "JSON text"
        if stripped.startswith((b"<!doctype html", b"<html")):
            return "HTML page"
        if stripped.startswith(b"<?xml"):
            return "XML document"
        return "plain text"
    return "unrecognised binary data"


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    if any(b < 0x20 and b not in b"\t\n\r\f" for b in head) or 0x7F in head:
        return False
    for cut in range(4):  # the 512-byte window may split a multi-byte UTF-8 character
        try:
            head[: len(head) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def _undecodable(kind: str, detail: str = "") -> UndecodableAudioError:
    detail = f" ({detail})" if detail else ""
    return UndecodableAudioError(
        f"Could not decode the upload as audio (it looks like: {kind}){detail}. {ACCEPTED}"
    )


# --- decoding ----------------------------------------------------------------------------
def decode_audio(source: bytes | str | Path, limits: AudioSettings | None = None) -> DecodedAudio:
    """Decode bytes or a file path to 16 kHz mono float32, enforcing `limits` (None: no limits).

    A missing path raises FileNotFoundError (a caller's mistake, not bad audio).

    Checks run cheapest first: size before decoding, sample rate and channel count from the
    header, and duration while decoding, so an over-long file is rejected without decoding it all.
    """
    data = _read(source, limits)
    if not data:
        raise EmptyAudioError("The upload is empty (0 bytes). Send an audio file.")
    kind = sniff(data)
    if kind in NON_AUDIO_KINDS:
        raise _undecodable(kind)
    if kind == "WAV audio" and (plain := _decode_plain_wav(data, limits)) is not None:
        return plain
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            return _decode_container(container, kind, limits)
    except _AV_ERRORS as exc:
        raise _undecodable(kind, f"{type(exc).__name__}: {exc}") from exc


QUICK_DECODE_MAX_BYTES = 512 * 1024
"""The largest upload `decode_quick` reads: a plain WAV this size (16 s) decodes in about 0.5 ms
(measured: 0.29 ms for 10 s), about what handing it to a worker thread and back costs an event
loop after idle on 2 cores (0.3 ms)."""


def decode_quick(data: bytes, limits: AudioSettings | None = None) -> DecodedAudio | None:
    """`decode_audio` for an upload it reads in well under a millisecond (a 16-kHz mono 16-bit
    WAV of at most QUICK_DECODE_MAX_BYTES), else None: a server decodes these on its event loop,
    and hands only the rest to a thread."""
    too_large = limits is not None and len(data) > limits.max_upload_bytes
    if too_large or len(data) > QUICK_DECODE_MAX_BYTES or sniff(data) != "WAV audio":
        return None
    return _decode_plain_wav(data, limits)


def _read(source: bytes | str | Path, limits: AudioSettings | None) -> bytes:
    max_bytes = limits.max_upload_bytes if limits else None
    if isinstance(source, (str, Path)):
        size = Path(source).stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise _too_large(size, max_bytes)
        return Path(source).read_bytes()
    data = bytes(source)
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


def _too_large(size: int, limit: int) -> AudioTooLargeError:
    return AudioTooLargeError(
        f"The upload is {_size(size)}; the limit is {_size(limit)}. "
        "Compress it (e.g. to flac, mp3 or opus) or split it into shorter files."
    )


def _check_format(rate: int, channels: int, limits: AudioSettings | None) -> None:
    if limits and rate > limits.max_sample_rate_hz:
        raise InvalidAudioError(
            f"The audio's sample rate is {rate} Hz; the limit is {limits.max_sample_rate_hz} Hz. "
            "Resample it (16 kHz is enough for speech)."
        )
    if limits and channels > limits.max_channels:
        raise InvalidAudioError(
            f"The audio has {channels} channels; the limit is {limits.max_channels}. "
            "Send mono or stereo."
        )


def _decode_container(container, kind: str, limits: AudioSettings | None) -> DecodedAudio:
    if not container.streams.audio:
        others = sorted({s.type for s in container.streams}) or ["nothing"]
        raise EmptyAudioError(
            f"The file has no audio track (it contains: {', '.join(others)}). {ACCEPTED}"
        )
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    rate, channels = ctx.sample_rate, ctx.layout.nb_channels  # 0 when the header lacks them
    _check_format(rate, channels, limits)  # before decoding anything

    max_s = limits.max_duration_s if limits else None
    chunks: list[np.ndarray] = []
    decoded_s = 0.0
    resampler, resampler_key = None, None
    for frame in container.decode(stream):
        _check_format(frame.sample_rate, frame.layout.nb_channels, limits)
        rate, channels = rate or frame.sample_rate, channels or frame.layout.nb_channels
        decoded_s += frame.samples / frame.sample_rate
        if max_s is not None and decoded_s > max_s + 1e-6:  # float sum of frame lengths
            raise _too_long(container.duration / 1e6 if container.duration else 0.0, max_s)
        frame.pts = None  # gaps/discontinuities in timestamps are irrelevant here
        if _unspecified_layout(frame):
            frame = _mean_downmix(frame)
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key != resampler_key:  # format changed mid-stream: drain the old resampler
            if resampler is not None:
                chunks.extend(_planes(resampler.resample(None)))
            resampler = av.AudioResampler(
                format="flt", layout="mono", rate=SAMPLE_RATE, options=_RESAMPLER_OPTIONS
            )
            resampler_key = key
        chunks.extend(_planes(resampler.resample(frame)))
    if resampler is not None:
        chunks.extend(_planes(resampler.resample(None)))

    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise EmptyAudioError(f"The {kind} file contains no audio samples. {ACCEPTED}")
    if not np.isfinite(samples).all():
        raise InvalidAudioError(
            "The audio contains NaN or infinite sample values (a broken float WAV?). "
            "Re-export it as 16-bit PCM."
        )
    np.clip(samples, -1.0, 1.0, out=samples)
    return DecodedAudio(
        samples=samples,
        duration_s=samples.size / SAMPLE_RATE,
        original_sample_rate=rate,
        original_channels=channels,
        codec=ctx.name,
        container=container.format.name,
    )


def _decode_plain_wav(data: bytes, limits: AudioSettings | None) -> DecodedAudio | None:
    """A 16-kHz mono 16-bit PCM WAV (what most clients send) read by libsndfile: the samples are
    FFmpeg's to the bit, in 0.5 ms instead of 13 for a 10-s clip (measured). None for any other
    WAV, or one libsndfile cannot read: FFmpeg decodes those, and words their errors."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as wav:  # the header, parsed once
            if (wav.format, wav.subtype, wav.samplerate, wav.channels) != ("WAV", "PCM_16", SAMPLE_RATE, 1):
                return None
            max_s = limits.max_duration_s if limits else None
            if max_s is not None and wav.frames > max_s * SAMPLE_RATE:
                raise _too_long(wav.frames / SAMPLE_RATE, max_s)
            samples = wav.read(dtype="float32")
    except sf.LibsndfileError:
        return None
    if samples.size == 0:
        raise EmptyAudioError(f"The WAV audio file contains no audio samples. {ACCEPTED}")
    return DecodedAudio(samples=samples, duration_s=samples.size / SAMPLE_RATE, original_sample_rate=SAMPLE_RATE,
                        original_channels=1, codec="pcm_s16le", container="wav")


def _too_long(stated: float, max_s: float) -> AudioTooLongError:
    """`stated`: the length the file says it has, in seconds (0 when it does not say)."""
    length = f"{stated:.1f} s long" if stated > max_s else f"longer than {max_s:g} s"
    return AudioTooLongError(
        f"Audio is {length}; the limit is {max_s:g} s. Split it into shorter files."
    )


def _planes(frames) -> list[np.ndarray]:
    return [f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames]


def _unspecified_layout(frame) -> bool:
    """WAVs without a channel mask (e.g. 3, 17, 32 channels) have no named layout; FFmpeg's
    down-mix fails or crashes on some of those, so they are averaged in numpy instead."""
    return frame.layout.name == f"{frame.layout.nb_channels} channels"


def _mean_downmix(frame) -> av.AudioFrame:
    fmt, n_ch = frame.format, frame.layout.nb_channels
    a = frame.to_ndarray()
    a = a if fmt.is_planar else a.reshape(-1, n_ch).T  # -> (channels, samples)
    base = fmt.name.rstrip("p") if fmt.is_planar else fmt.name
    if base in _INT_FULL_SCALE:
        a = a.astype(np.float64)
        if base == "u8":
            a -= 128.0
        a /= _INT_FULL_SCALE[base]
    mono = a.mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]
    out = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono), format="flt", layout="mono")
    out.sample_rate = frame.sample_rate
    return out


# --- encoding ----------------------------------------------------------------------------
def audio_to_wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode float samples in [-1, 1] (mono, or (frames, channels)) as a 16-bit PCM WAV."""
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


__all__ = [
    "ACCEPTED",
    "SAMPLE_RATE",
    "DecodedAudio",
    "audio_to_wav_bytes",
    "decode_audio",
    "decode_quick",
    "sniff",
]
