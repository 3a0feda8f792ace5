"""A fuzzer over the upload path: mutations of valid WAV, FLAC, MP3, Ogg and WebM files and of the
multipart framing around them, sent to POST /v1/audio/transcriptions.

    python -m loadtests.upload_fuzz [--url URL] [--cases 2000] [--api-key KEY]

Every answer must be a 2xx, or a 4xx in the OpenAI error shape with a message; a 5xx (or a
dropped connection) is a failure, which hypothesis shrinks to the smallest upload that causes it.
After the cases the service must still answer a good request. Without --url a service is
started here (`python -m asrops.cli serve` on ASROPS_DATA_DIR), and the ingress's memory is also
measured through a 200 MiB chunked upload (it must get 413, or 401 without a key, and the
ingress must not grow by more than 100 MB). The suite runs the same strategies for a few hundred
cases against the in-process API (tests/test_upload_fuzz.py).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ENDPOINT = "/v1/audio/transcriptions"
BOUNDARY = b"asropsfuzzboundary"


# --- seeds: one second and a half of a tone in each container --------------------------------
def seed_files() -> dict[str, bytes]:
    """Valid uploads in each container a client may send (every one decodes to audio)."""
    import av
    import soundfile as sf

    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(24_000) / 16_000)).astype(np.float32)
    seeds = {}
    for name, fmt, subtype in (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"),
                               ("mp3", "MP3", "MPEG_LAYER_III")):
        buf = io.BytesIO()
        sf.write(buf, samples, 16_000, format=fmt, subtype=subtype)
        seeds[name] = buf.getvalue()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48_000, layout="mono")
        pcm = np.repeat(samples, 3)[None, :]  # 48 kHz
        frame = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
        frame.sample_rate = 48_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    seeds["webm"] = buf.getvalue()
    return seeds


# --- strategies -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Upload:
    body: bytes
    content_type: str
    note: str

    def __repr__(self) -> str:  # what hypothesis prints for a failing case
        return f"Upload({self.note}; {len(self.body)} bytes; content-type {self.content_type!r})"


def _mutated(data: st.DataObject, audio: bytes) -> tuple[bytes, str]:
    kind = data.draw(st.sampled_from(["intact", "truncate", "flip", "insert", "overwrite_header", "splice"]))
    if kind == "intact" or not audio:
        return audio, kind
    at = data.draw(st.integers(0, len(audio) - 1))
    if kind == "truncate":
        return audio[:at], f"truncated at {at}"
    if kind == "flip":
        flips = data.draw(st.lists(st.integers(0, len(audio) - 1), min_size=1, max_size=16))
        out = bytearray(audio)
        for i in flips:
            out[i] ^= 0xFF
        return bytes(out), f"{len(flips)} bytes flipped"
    if kind == "insert":
        junk = data.draw(st.binary(min_size=1, max_size=512))
        return audio[:at] + junk + audio[at:], f"{len(junk)} bytes inserted at {at}"
    if kind == "overwrite_header":
        junk = data.draw(st.binary(min_size=4, max_size=64))
        return junk + audio[len(junk):], f"first {len(junk)} bytes replaced"
    return audio[:at] + audio[data.draw(st.integers(0, len(audio) - 1)):], "spliced with itself"


FIELDS = ["model", "response_format", "temperature", "language", "prompt", "timestamp_granularities[]",
          "stream", "include[]", "chunking_strategy", "unknown_field"]
FIELD_VALUES = st.one_of(
    st.sampled_from(["whisper-1", "stable", "canary", "json", "text", "srt", "verbose_json", "vtt", "0", "-1",
                     "1e309", "nan", "en", "xx", "word", "segment", "true", "false", "auto"]),
    st.text(max_size=64),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)
FILENAMES = st.sampled_from(["clip.wav", "clip.mp3", "clip", "", "../../etc/passwd", "a\"b.wav", "ü.flac",
                             "x" * 300 + ".wav", "clip.png"])
FILE_TYPES = st.sampled_from(["audio/wav", "audio/mpeg", "audio/ogg", "audio/webm", "audio/flac",
                              "application/octet-stream", "text/plain", ""])


def _part(headers: bytes, content: bytes) -> bytes:
    return b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"


@st.composite
def uploads(draw: st.DrawFn, seeds: dict[str, bytes]) -> Upload:
    data = draw(st.data())
    fmt = draw(st.sampled_from(sorted(seeds)))
    audio, mutation = _mutated(data, seeds[fmt])
    filename, file_type = draw(FILENAMES), draw(FILE_TYPES)
    file_headers = f'Content-Disposition: form-data; name="file"; filename="{filename}"'.encode()
    if file_type:
        file_headers += f"\r\nContent-Type: {file_type}".encode()
    fields = draw(st.lists(st.tuples(st.sampled_from(FIELDS), FIELD_VALUES), max_size=4))
    parts = [_part(f'Content-Disposition: form-data; name="{name}"'.encode(), value.encode("utf-8", "replace"))
             for name, value in fields]
    framing = draw(st.sampled_from(["proper", "proper", "proper", "no_file", "two_files", "no_closing",
                                    "bare_lf", "wrong_boundary", "no_boundary", "cut", "nameless_part",
                                    "not_multipart"]))
    file_part = _part(file_headers, audio)
    if framing == "no_file":
        file_part = b""
    elif framing == "two_files":
        file_part = file_part * 2
    elif framing == "nameless_part":
        file_part = _part(b"Content-Disposition: form-data", audio)
    body = b"".join(parts) + file_part + b"--" + BOUNDARY + b"--\r\n"
    content_type = "multipart/form-data; boundary=" + BOUNDARY.decode()
    if framing == "no_closing":
        body = body[: -len(BOUNDARY) - 6]
    elif framing == "bare_lf":
        body = body.replace(b"\r\n", b"\n")
    elif framing == "wrong_boundary":
        content_type = "multipart/form-data; boundary=somethingelse"
    elif framing == "no_boundary":
        content_type = "multipart/form-data"
    elif framing == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif framing == "not_multipart":
        content_type = draw(st.sampled_from(["audio/wav", "application/json", "text/plain", ""]))
    return Upload(body, content_type, f"{fmt}, {mutation}, {framing}, {len(fields)} fields, filename {filename!r}")


# --- judging ----------------------------------------------------------------------------------
def problem(status: int, headers: dict[str, str], body: bytes) -> str | None:
    """What is wrong with an answer to an upload (None when it is acceptable)."""
    if status >= 500:
        return f"{status}: {body[:300]!r}"
    if 200 <= status < 300:
        return None
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} not in the OpenAI error shape: {body[:300]!r}"
    if not isinstance(error, dict) or not error.get("message") or not error.get("type"):
        return f"{status} error without a message or type: {error!r}"
    return None


Send = Callable[[Upload], tuple[int, dict[str, str], bytes]]


def fuzz(send: Send, seeds: dict[str, bytes], cases: int, seed: int = 0) -> Counter[str]:
    """Send `cases` uploads; returns the answers' statuses. Raises (after shrinking) on the first
    unacceptable answer."""
    statuses: Counter[str] = Counter()

    @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(uploads(seeds))
    def one(upload: Upload) -> None:
        status, headers, body = send(upload)
        statuses[str(status)] += 1
        if (wrong := problem(status, headers, body)) is not None:
            raise AssertionError(f"{upload!r} -> {wrong}")

    from hypothesis import seed as hypothesis_seed

    hypothesis_seed(seed)(one)()
    return statuses


# --- against a running service ------------------------------------------------------------------
SERVE_PROCESSES = {"ingress": ("ServeReplica", "ingress"), "proxy": ("ProxyActor",)}
"""What a client's upload passes through, by the words Ray names their processes with."""


def serve_rss() -> dict[str, int]:
    """Resident bytes of the ingress replica and Serve's HTTP proxy on this machine."""
    import psutil

    found: dict[str, int] = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        name = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
        for part, words in SERVE_PROCESSES.items():
            if all(w in name for w in words):
                try:
                    found[part] = proc.memory_info().rss
                except psutil.Error:
                    pass
    return found


class RssWatch:
    """Peak RSS growth (MB) of the ingress and the proxy while the `with` block runs, sampled
    every 50 ms from a thread (the upload itself may block on backpressure)."""

    def __init__(self) -> None:
        import threading

        self.before = serve_rss()
        self.peak = dict(self.before)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            for part, rss in serve_rss().items():
                self.peak[part] = max(self.peak.get(part, 0), rss)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth_mb(self) -> dict[str, float]:
        return {part: (self.peak[part] - rss) / 1e6 for part, rss in self.before.items()}


def chunked_upload(url: str, total_mib: int, api_key: str | None) -> int:
    """Send a `total_mib` multipart upload with no Content-Length (chunked); returns the status."""
    import httpx

    def chunks():
        head = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
                b"Content-Type: audio/wav\r\n\r\n")
        yield head
        block = b"\0" * (1 << 20)
        for _ in range(total_mib):
            yield block
        yield b"\r\n--" + BOUNDARY + b"--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=" + BOUNDARY.decode()}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        return httpx.post(url + ENDPOINT, content=chunks(), headers=headers, timeout=300).status_code
    except httpx.HTTPError as exc:  # the server may close the connection after answering early
        return getattr(getattr(exc, "response", None), "status_code", 0) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.upload_fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service (default: start one here)")
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--api-key", help="the key to send (when the service has keys)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import httpx

    from loadtests.service_bench import running_server

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log_path = Path("out/upload-fuzz-serve.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "asrops.cli", "serve"]
    with running_server(args.url, command, "/readyz", log_path, 900, say) as server, \
            httpx.Client(timeout=120) as http:
        url = server.url
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        seeds = seed_files()
        sent = 0
        started = time.monotonic()

        def send(upload: Upload) -> tuple[int, dict[str, str], bytes]:
            nonlocal sent
            sent += 1
            if sent % 100 == 0:
                say(f"upload fuzz: {sent}/{args.cases} cases ({time.monotonic() - started:.0f} s)")
            headers = {**auth, **({"Content-Type": upload.content_type} if upload.content_type else {})}
            r = http.post(url + ENDPOINT, content=upload.body, headers=headers)
            return r.status_code, dict(r.headers), r.content

        statuses = fuzz(send, seeds, args.cases, args.seed)
        good = http.post(url + ENDPOINT, files={"file": ("clip.wav", seeds["wav"], "audio/wav")}, headers=auth)
        rows = [f"| fuzz cases | {sum(statuses.values())} |",
                *(f"| answered {status} | {n} |" for status, n in sorted(statuses.items())),
                f"| good request afterwards | {good.status_code} |"]
        if not args.url:  # the ingress is on this machine: its memory can be watched
            with RssWatch() as watch:
                status = chunked_upload(url, 200, args.api_key)
            grew = ", ".join(f"{part} RSS +{mb:.0f} MB" for part, mb in sorted(watch.growth_mb.items()))
            rows.append(f"| 200 MiB chunked upload | {status}, {grew or 'serve processes not found'} |")
        print("| what | result |\n| --- | --- |\n" + "\n".join(rows))
        return 0 if good.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
