"""A corpus of bad uploads, each with the status a client should get back."""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf


@dataclass
class Case:
    name: str
    status: int
    files: dict | None = None
    data: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


def _wav(samples: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _wav_header(rate: int, channels: int, bits: int = 16, data: bytes = b"\0" * 3200) -> bytes:
    """A hand-written PCM WAV header (lets us claim absurd rates and channel counts)."""
    block = min(channels * bits // 8, 65_535)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def malformed_uploads(good_flac: bytes) -> list[Case]:
    one_s = (np.sin(np.linspace(0, 2000 * np.pi, 16_000)) * 0.3).astype(np.float32)
    nan_wav = _wav(np.where(np.arange(16_000) == 500, np.nan, one_s).astype(np.float32), subtype="FLOAT")
    inf_wav = _wav(np.where(np.arange(16_000) == 500, np.inf, one_s).astype(np.float32), subtype="FLOAT")
    good_wav = _wav(one_s)
    rng = np.random.default_rng(0)
    garbage = rng.bytes(64 * 1024)

    def upload(name: str, status: int, content: bytes, filename: str = "audio.wav", ctype: str = "audio/wav", **data):
        return Case(name, status, files={"file": (filename, content, ctype)}, data=data)

    return [
        # empty and truncated
        upload("zero bytes", 400, b""),
        upload("wav header only", 400, good_wav[:44]),
        upload("half a wav header", 415, good_wav[:22]),
        upload("flac cut after 100 bytes", 415, good_flac[:100], "a.flac", "audio/flac"),
        upload("ogg magic then garbage", 415, b"OggS" + garbage[:4000], "a.ogg", "audio/ogg"),
        upload("RIFF AVI header, no streams", 400, b"RIFF" + struct.pack("<I", 4000) + b"AVI " + garbage[:4000]),
        # not audio at all
        upload("random bytes", 415, garbage),
        upload("PNG image", 415, b"\x89PNG\r\n\x1a\n" + garbage[:2000], "a.png", "image/png"),
        upload("JPEG image", 415, b"\xff\xd8\xff\xe0" + garbage[:2000], "a.jpg", "image/jpeg"),
        upload("PDF document", 415, b"%PDF-1.7\n" + garbage[:2000], "a.pdf", "application/pdf"),
        upload("ZIP archive", 415, b"PK\x03\x04" + garbage[:2000], "a.zip", "application/zip"),
        upload("JSON text", 415, b'{"audio": "not really"}', "a.json", "application/json"),
        upload("HTML page", 415, b"<!doctype html><html><body>hi</body></html>", "a.html", "text/html"),
        upload("plain text", 415, b"hello, this is not audio\n" * 20, "a.txt", "text/plain"),
        upload("PNG sent as audio/wav", 415, b"\x89PNG\r\n\x1a\n" + garbage[:2000]),
        # decodes, but the signal is unusable
        upload("float wav with NaN", 400, nan_wav),
        upload("float wav with +inf", 400, inf_wav),
        upload("1 MHz sample rate", 400, _wav_header(1_000_000, 1)),
        upload("40 channels", 400, _wav_header(16_000, 40, data=b"\0" * 40 * 2 * 1600)),
        upload("65535 channels (FFmpeg refuses)", 415, _wav_header(8_000, 65_535, data=b"\0" * 65_535 * 2)),
        # limits
        upload("601 s of audio", 413, _wav_header(8_000, 1, bits=8, data=b"\x80" * 8_000 * 601)),
        upload("26 MiB upload", 413, b"\0" * (26 * 1024 * 1024)),
        # fields
        Case("no file field", 400, files=None, data={"model": "whisper-1"}),
        Case("file sent as a text field", 400, files=None, data={"file": "not a file", "model": "whisper-1"}),
        Case("not multipart (JSON body)", 400, files=None, headers={"content-type": "application/json"}),
        upload("unknown response_format", 400, good_wav, response_format="xml"),
        upload("non-English language", 400, good_wav, language="fr"),
        upload("temperature not a number", 400, good_wav, temperature="hot"),
        upload("temperature out of range", 400, good_wav, temperature="5"),
        upload("word timestamps", 400, good_wav, **{"timestamp_granularities[]": "word"}),
        upload("unknown timestamp granularity", 400, good_wav, **{"timestamp_granularities[]": "century"}),
        upload("unknown model", 404, good_wav, model="whisper-9000"),
        # hostile file names (with content that is not audio, so a 4xx is due)
        upload("path traversal name", 415, garbage[:3000], "../../../../etc/passwd"),
        upload("10,000-character name (multipart refused)", 400, garbage[:3000], "a" * 10_000 + ".wav"),
        upload("control characters in name", 415, garbage[:3000], "evil\r\nX-Injected: 1.wav"),
        upload("right-to-left override name", 415, garbage[:3000], "harmless\u202egnp.wav"),
        upload("shell metacharacters name", 415, garbage[:3000], "$(rm -rf ~);`id`|.wav"),
        upload("name that is a URL", 415, os.urandom(0) + garbage[:3000], "http://169.254.169.254/latest"),
    ]
