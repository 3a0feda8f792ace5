"""Service benchmark: asrops (Ray Serve, dynamic batching) against a one-request-at-a-time
faster-whisper server (`loadtests.peer_server`), over HTTP, with the same real clips.

    python -m loadtests.service_bench [--ours URL] [--peer URL] [--clips 40] [--levels 1,4,16]
                                      [--requests-per-level N] [--wer-clips 245] [--engine-clips 245]
                                      [--out-dir out/service-bench]

A server not given by URL is started here (ours: `python -m asrops.cli serve`, with
ASROPS_DATA_DIR from the environment; the peer: `python -m loadtests.peer_server`) and stopped
afterwards. One server is measured at a time, so the two never compete for the CPU. Per
concurrency level c: c warm-up requests (discarded), then a closed loop of c clients, each
sending its next request as soon as its last one is answered, round-robin over the clips.
Then each server transcribes every core clip once (`--wer-clips`, at concurrency 16): the WER
of a level's few dozen requests moves 0.14 point per word, the core set's about 0.03.

The bare-engine reference (our engine in-process, one clip at a time, in its own process, over
the very clips the concurrency-1 level sends, in its order) shows what serving costs at
concurrency 1; the product target is ours p50 / bare p50 <= 1.15. This machine's speed drifts
by 15-25 % within minutes, so the two are timed interleaved, in blocks of a few clips: per
block, ours one request at a time, the bare engine beside our idle service (what the stack's
idle processes cost an engine on the same cores), and the bare engine alone, with every process
of our service paused (SIGSTOP) for the second it takes; the CPU the rest of the machine used
meanwhile is printed, to show it was alone. Each side's first request of a block goes untimed
(`measure_c1_against_bare_engine` says why). The
engine ratio (`asrops bench engine`, onnx-int8 against faster-whisper int8: RTFx and peak RSS)
is measured in the same run, and every timed loop lists the CPU each process on the machine
used (Ray's processes, the replicas, the side processes, this client), to show where it goes,
and what the hypervisor took from this VM meanwhile (CPU steal), to show when a contended host,
not a server, set a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
from pydantic import BaseModel

from asrops.cpu_wakeup import NO_CPUIDLE_DRIVER, cpuidle_driver
from asrops.evaluation import score
from asrops.formats import engine_time
from loadtests import CHECKOUT_SPEECH, speech_settings

ENDPOINT = "/v1/audio/transcriptions"
OVERHEAD_TARGET = 1.15
"""Ours p50 at concurrency 1 over the bare engine's p50: what serving may add."""
THROUGHPUT_GOALS = {1: 1.0, 4: 1.5, 16: 2.0}
"""Ours / peer throughput wanted at each concurrency (issue 19)."""
ENGINE_GOALS = {"rtfx": 1.5, "peak_rss": 1.5}
"""Our engine against faster-whisper int8: at least 1.5 x its RTFx, at most 1.5 x its peak RSS."""
CORE_SET_CONCURRENCY = 16
"""Clients while each server transcribes the whole core set for its WER (`--wer-clips`)."""
MIN_CPU_SHARE = 0.01
"""Processes that used less than 1 % of a core during a loop are left out of its CPU list."""
STEAL_NOTE_CORES = 0.05
"""CPU steal (the hypervisor running others on this VM's CPUs) from which the report's second
line warns that a loop's figures are the host's doing: 5 % of a core."""


# --- clips -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    name: str
    wav: bytes
    """16 kHz mono 16-bit WAV: every server (and the bare engine) decodes the same bytes."""
    audio_s: float
    text: str = ""
    """What is said in it (the manifest's transcript): each level's WER is scored against it."""


def load_clips(n: int, speech_dir: Path | None = None) -> list[Clip]:
    """The first `n` clips of the core English subset of ../shared/data/speech, as WAV bytes."""
    from asrops.audio import audio_to_wav_bytes, decode_audio
    from asrops.evaluation import core_english_filter, load_manifest

    manifest = Path(speech_dir or speech_settings().speech_data_dir or CHECKOUT_SPEECH) / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(
            f"No speech data: {manifest} is missing. Put the shared speech data beside the checkout "
            "(../shared/data/speech) or set ASROPS_SPEECH_DATA_DIR."
        )
    clips = []
    for item in load_manifest(manifest, filter=core_english_filter)[:n]:
        audio = decode_audio(item.audio)
        clips.append(Clip(f"{Path(item.audio).stem}.wav", audio_to_wav_bytes(audio.samples), audio.duration_s,
                          item.text))
    return clips


# --- statistics --------------------------------------------------------------------------
class ProcessCpu(BaseModel):
    """One kind of process (`process_label`) and the CPU it used during a timed loop."""

    process: str
    cpu_s: float
    cores: float
    """cpu_s / the loop's wall seconds: 1.0 is one core busy the whole time."""


class Sample(NamedTuple):
    latency_s: float
    status: int
    """HTTP status; 0 when no response came (connection error, client timeout)."""
    audio_s: float
    batch_size: int | None = None
    """X-Batch-Size of the response (ours only): how many requests were decoded together."""
    reference: str = ""
    hypothesis: str | None = None
    """The answer's text (None when there was no answer)."""
    engine_s: float | None = None
    """The model's own time on the request, from the `Server-Timing: engine;dur=` header (ours only)."""


class LevelResult(BaseModel):
    concurrency: int
    requests: int
    errors: int
    error_statuses: dict[str, int] = {}
    wall_s: float
    audio_s: float
    """Audio seconds of the answered (200) requests."""
    throughput: float
    """Audio seconds transcribed per wall-clock second."""
    requests_per_s: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    mean_batch_size: float | None = None
    engine_p50_s: float | None = None
    """Median of the model's own time per request (ours only: `Server-Timing`)."""
    serving_p50_s: float | None = None
    """Median of latency minus the model's time per request: what serving (client, HTTP, proxy,
    ingress, the hop to the replica, waiting for a lane) added."""
    wer: float | None = None
    """WER (%) of the answered requests against their clips' transcripts: serving under load
    (batching, window packing) must not cost accuracy."""
    cpu: list[ProcessCpu] = []
    """CPU time of every process on the machine during the timed loop, busiest first."""
    host_steal_cores: float | None = None
    """Cores the hypervisor took from this VM during the loop (CPU steal; None where the kernel
    does not count it): a contended host slows whichever server it meets."""


class ServerResult(BaseModel):
    name: str
    url: str
    levels: list[LevelResult]
    core_set: LevelResult | None = None
    """Every clip of the core set once, at CORE_SET_CONCURRENCY: WER on enough words (about
    4,000) that a difference of 0.2 point is 8 words, not a fraction of one."""


class LevelRatio(BaseModel):
    """Ours / peer at one concurrency: throughput above 1 and latencies below 1 favour ours."""

    concurrency: int
    throughput: float | None
    p50: float | None
    p95: float | None
    p99: float | None


class BareEngine(BaseModel):
    engine: str = "onnx-int8"
    threads: int
    clips: int
    p50_s: float
    mean_s: float
    latencies_s: list[float]


class EngineRatio(BaseModel):
    """`asrops bench engine` in the same run: our onnx-int8 engine against faster-whisper int8."""

    clips: int
    rtfx: float
    peer_rtfx: float
    peak_rss_mb: float
    peer_peak_rss_mb: float
    wer: float | None = None
    peer_wer: float | None = None
    host_steal_cores: float | None = None
    """Cores the hypervisor took from this VM during the engine benchmark (CPU steal)."""

    @property
    def rtfx_ratio(self) -> float:
        return self.rtfx / self.peer_rtfx

    @property
    def rss_ratio(self) -> float:
        return self.peak_rss_mb / self.peer_peak_rss_mb


class C1AgainstBareEngine(BaseModel):
    """Ours at concurrency 1 and the bare engine on the same clips, interleaved in blocks
    (`measure_c1_against_bare_engine`)."""

    ours: LevelResult
    ours_latencies_s: list[float]
    ours_engine_s: list[float | None]
    """Per request, in the order sent (the bare engines' latencies_s are in the same order)."""
    bare_beside: BareEngine
    """Beside our idle service: what its idle processes cost an engine sharing the cores."""
    bare_alone: BareEngine | None
    """With our service paused (None when it was not started here)."""
    stack_cpu_beside: list[ProcessCpu]
    """What the idle stack used while the bare engine ran beside it."""
    stack_cpu_paused: list[ProcessCpu]
    """What anything but the bare engine used while our service was paused (the check that it was)."""
    bare_paced: BareEngine | None = None
    """Alone too, with a pause of PACE_S before each clip, as serving puts one between a lone
    client's engine runs: for reading the ratio on a machine whose idle CPUs halt, where the
    engine runs slower after one (the goal stays against the bare engine back to back)."""
    host_steal_cores: float | None = None
    """Cores the hypervisor took from this VM during the interleaved blocks (CPU steal): the
    blocks' only reading, since ours and the bare engine take turns within them (so `ours`, the
    level summed from ours' turns, has none of its own)."""

    @property
    def overhead(self) -> float | None:
        """Ours p50 / the bare engine's p50 alone: the product target is <= OVERHEAD_TARGET."""
        return ratio(self.ours.p50_s, self.bare_alone.p50_s if self.bare_alone else None)


class BenchResult(BaseModel):
    clips: int
    clip_audio_s: float
    levels: list[int]
    ours: ServerResult
    peer: ServerResult
    ratios: list[LevelRatio]
    """Ours / peer per concurrency level."""
    c1_against_bare_engine: C1AgainstBareEngine | None
    overhead_target: float = OVERHEAD_TARGET
    engine: EngineRatio | None = None
    cpu_wakeup_latency_us: int | None = None
    """The CPU wake-up latency bound held for the whole run (`measure_on_one_machine_state`), or
    None when none was."""
    cpuidle_driver: str | None = None
    """The kernel's cpuidle driver, which applies that bound (`none`: idle CPUs halt regardless)."""


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def summarize(samples: list[Sample], concurrency: int, wall_s: float) -> LevelResult:
    """One level's numbers; latency percentiles and throughput count answered requests only."""
    ok = [s for s in samples if s.status == 200]
    latencies = [s.latency_s for s in ok]
    audio_s = sum(s.audio_s for s in ok)
    batches = [s.batch_size for s in ok if s.batch_size]
    timed = [s for s in ok if s.engine_s is not None]
    scored = [s for s in ok if s.hypothesis is not None and s.reference]
    return LevelResult(
        concurrency=concurrency,
        requests=len(samples),
        errors=len(samples) - len(ok),
        error_statuses={str(k): v for k, v in Counter(s.status for s in samples if s.status != 200).items()},
        wall_s=wall_s,
        audio_s=audio_s,
        throughput=audio_s / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        p50_s=percentile(latencies, 50),
        p95_s=percentile(latencies, 95),
        p99_s=percentile(latencies, 99),
        mean_batch_size=float(np.mean(batches)) if batches else None,
        engine_p50_s=percentile([s.engine_s for s in timed], 50),
        serving_p50_s=percentile([s.latency_s - s.engine_s for s in timed], 50),
        wer=score([s.reference for s in scored], [s.hypothesis for s in scored]).wer if scored else None,
    )


def compare(ours: ServerResult, peer: ServerResult) -> list[LevelRatio]:
    """Ours / peer at every concurrency both were measured at."""
    theirs = {lv.concurrency: lv for lv in peer.levels}
    return [
        LevelRatio(
            concurrency=o.concurrency,
            throughput=ratio(o.throughput, p.throughput),
            p50=ratio(o.p50_s, p.p50_s),
            p95=ratio(o.p95_s, p.p95_s),
            p99=ratio(o.p99_s, p.p99_s),
        )
        for o in ours.levels
        if (p := theirs.get(o.concurrency))
    ]


def default_requests(concurrency: int) -> int:
    """Enough requests for a p95 at low concurrency, and four per client at high concurrency
    (fewer, and the closed loop's ramp-up and drain weigh too much in the throughput)."""
    return max(4 * concurrency, 24)


# --- load generation ---------------------------------------------------------------------
async def _post(client: httpx.AsyncClient, url: str, clip: Clip) -> Sample:
    start = time.perf_counter()
    try:
        response = await client.post(
            url + ENDPOINT,
            files={"file": (clip.name, clip.wav, "audio/wav")},
            data={"model": "whisper-1", "response_format": "json"},
        )
        status, batch = response.status_code, response.headers.get("x-batch-size", "")
        text = response.json().get("text") if status == 200 else None
        engine_s = engine_time(response.headers.get("server-timing", ""))
    except (httpx.HTTPError, ValueError):
        status, batch, text, engine_s = 0, "", None, None
    return Sample(time.perf_counter() - start, status, clip.audio_s, int(batch) if batch.isdigit() else None,
                  clip.text, text, engine_s)


def level_clip(i: int, n_clips: int) -> int:
    """The clip a level's i-th request sends: round-robin over the clips."""
    return i % n_clips


async def run_level(url: str, clips: list[Clip], concurrency: int, n_requests: int) -> LevelResult:
    """Warm up with `concurrency` requests, then time a closed loop of `n_requests`."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(_post(client, url, clips[level_clip(i, len(clips))]) for i in range(concurrency)))
        order = iter(range(n_requests))  # shared: each client takes the next request index
        samples: list[Sample] = []

        async def client_loop() -> None:
            for i in order:
                samples.append(await _post(client, url, clips[level_clip(i, len(clips))]))

        before, meter = cpu_snapshot(), StealMeter()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
        after, steal = cpu_snapshot(), meter.cores()
    return summarize(samples, concurrency, wall_s).model_copy(update={
        "cpu": cpu_by_process(before, after, wall_s),
        "host_steal_cores": steal})


# --- CPU per process ---------------------------------------------------------------------
PROCESS_LABELS = (
    ("asrops.cli serve", "asrops serve (driver)"), ("asrops.cli monitor", "drift monitor"),
    ("asrops.cli controller", "promotion controller"), ("dashboard/agent.py", "ray dashboard agent"),
    ("dashboard/dashboard.py", "ray dashboard"), ("runtime_env/agent", "ray runtime-env agent"),
    ("log_monitor.py", "ray log monitor"), ("loadtests.service_bench", "benchmark client"),
    ("loadtests.peer_server", "peer server"),
)
"""(a piece of a command line, the label of its process), first match wins."""


def process_label(name: str, cmdline: list[str]) -> str:
    """What a process is, in a few words: Ray actors by their title (`ray::ServeReplica:...`),
    `asrops` side processes by their command, the rest by name."""
    head = cmdline[0] if cmdline else name
    if head.startswith("ray::"):
        return head.split(" ")[0]
    joined = " ".join(cmdline)
    return next((label for marker, label in PROCESS_LABELS if marker in joined), name)


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """Every process's (label, user + system CPU seconds) now."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        info = proc.info
        if info["cpu_times"] is not None:
            out[proc.pid] = (process_label(info["name"] or "?", info["cmdline"] or []),
                             info["cpu_times"].user + info["cpu_times"].system)
    return out


def cpu_by_process(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                   wall_s: float) -> list[ProcessCpu]:
    """CPU used between two snapshots, summed by label (a process born in between counts from 0)."""
    return as_cores(cpu_used(before, after), wall_s)


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
             exclude: int | None = None) -> Counter[str]:
    """CPU seconds per label between two snapshots, leaving out the process `exclude`."""
    used: Counter[str] = Counter()
    for pid, (label, cpu) in after.items():
        if pid != exclude:
            used[label] += cpu - before.get(pid, (label, 0.0))[1]
    return used


def host_steal_s() -> float | None:
    """CPU seconds this VM's CPUs have spent running someone else since boot, all CPUs together
    (Linux's `steal` in /proc/stat); None where the kernel does not count it."""
    import psutil

    return getattr(psutil.cpu_times(), "steal", None)


def steal_cores(before: float | None, after: float | None, wall_s: float) -> float | None:
    """Cores the hypervisor took between two `host_steal_s` readings `wall_s` apart."""
    if before is None or after is None or wall_s <= 0:
        return None
    return round((after - before) / wall_s, 3)


class StealMeter:
    """Started where a timed part starts; `cores()` is what the hypervisor took since."""

    def __init__(self) -> None:
        self._steal_s, self._start = host_steal_s(), time.perf_counter()

    def cores(self) -> float | None:
        return steal_cores(self._steal_s, host_steal_s(), time.perf_counter() - self._start)


def as_cores(used: Counter[str], wall_s: float) -> list[ProcessCpu]:
    """Busiest first, those under MIN_CPU_SHARE of a core left out."""
    return [ProcessCpu(process=label, cpu_s=round(cpu, 2), cores=round(cpu / wall_s, 3))
            for label, cpu in used.most_common() if wall_s > 0 and cpu / wall_s >= MIN_CPU_SHARE]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def bench_server(name: str, url: str, clips: list[Clip], levels: list[int], requests_per_level: int | None,
                 core_set: list[Clip], say: Callable[[str], None]) -> ServerResult:
    """The timed levels over `clips`, then (when given) every clip of `core_set` once for its WER."""

    def said(label: str, r: LevelResult) -> LevelResult:
        say(f"{name:5} {label:8} {r.requests:4d} req  {r.throughput:7.2f} audio-s/s  {r.requests_per_s:6.2f} req/s  "
            f"p50 {_fmt(r.p50_s)} s  p95 {_fmt(r.p95_s)} s  WER {_fmt(r.wer, '.2f')} %  errors {r.errors}"
            + (f"  (engine p50 {_fmt(r.engine_p50_s)} s, serving p50 {_fmt(r.serving_p50_s)} s)"
               if r.engine_p50_s is not None else ""))
        return r

    results = [said(f"c={c}", asyncio.run(run_level(url, clips, c, requests_per_level or default_requests(c))))
               for c in levels]
    whole = said("core set", asyncio.run(run_level(url, core_set, CORE_SET_CONCURRENCY, len(core_set)))) \
        if core_set else None
    return ServerResult(name=name, url=url, levels=results, core_set=whole)


# --- servers -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} was ready:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s (log: {log_path})")


class RunningServer(NamedTuple):
    url: str
    pid: int | None
    """The process started here (None for a server given by URL): its tree can be paused."""


@contextmanager
def running_server(url: str | None, command: list[str], ready_path: str, log_path: Path,
                   timeout_s: float, say: Callable[[str], None]) -> Iterator[RunningServer]:
    """`url` if given; otherwise start `command --port P`, yield it once ready, stop it."""
    if url:
        yield RunningServer(url.rstrip("/"), None)
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"starting {' '.join(command)} on port {port} (log: {log_path})")
    with log_path.open("w") as log:
        proc = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group, so a hung one can be killed whole
        try:
            _wait_ready(url + ready_path, proc, log_path, timeout_s)
            yield RunningServer(url, proc.pid)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C first (`asrops serve` shuts Serve and Ray down on it), then kill its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- ours at concurrency 1 against the bare engine ---------------------------------------
C1_BLOCK = 4
"""Clips per block of the interleaved c=1 comparison: a block's three timings lie seconds apart."""
C1_PASSES = 6
"""Each clip is timed this many times each way (`--c1-passes`). The same clip's engine run moves by
up to 2x between blocks on this machine (a quiet host by steal), so the ratio of two p50s over few
passes is mostly noise: in one run of 8 passes (loadtests/RESULTS.md, 2026-12-06), the ratio over
any 2 of them spread with a standard deviation of 6.3 points, over any 4 of them 2.9."""
RESUME_SETTLE_S = 1.0
"""After a pause, the service's periodic work that came due meanwhile runs before ours is timed again."""
PACE_S = 0.010
"""The paced bare engine's pause before each clip: about what serving puts between two engine runs
of a lone client (8-10 ms), long enough for an idle CPU to halt (loadtests/RESULTS.md, 2026-12-05
evening: a 10-ms pause made the bare engine 1.06x slower on a VM without a cpuidle driver)."""


class BareEngineWorker:
    """Our engine (the stable version's onnx-int8) in a process of its own (`bare_engine`), loaded
    once with the clips `order` indexes; `time_clips` times some of them, one at a time."""

    def __init__(self, proc: subprocess.Popen, stderr):
        self._proc, self._stderr = proc, stderr

    @property
    def pid(self) -> int:
        return self._proc.pid

    def time_clips(self, positions: list[int], pause_s: float = 0.0) -> list[float]:
        """Seconds per clip for the clips at these positions of `order`, each after `pause_s` of sleep."""
        self._proc.stdin.write(json.dumps({"positions": positions, "pause_s": pause_s}) + "\n")
        self._proc.stdin.flush()
        return self.reply()

    def reply(self):
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise RuntimeError(f"the bare engine exited (code {self._proc.wait()}):\n{self._stderr.read()[-2000:]}")
        return json.loads(line)


@contextmanager
def bare_engine(order: list[int], threads: int) -> Iterator[BareEngineWorker]:
    """A BareEngineWorker, loaded and warmed up; stopped on leaving."""
    job = json.dumps({"order": order, "threads": threads})
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "loadtests.service_bench", "--bare-engine-worker", job],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            worker = BareEngineWorker(proc, stderr)
            worker.reply()  # loaded
            yield worker
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _bare_engine_worker(job: dict) -> None:
    """Prints a line once loaded, then reads lines of positions into job["order"] (with a pause
    before each clip) and prints each one's per-clip latencies (a JSON list)."""
    from asrops.audio import decode_audio
    from asrops.engines import engine_lanes, load_engine
    from asrops.registry import ModelRegistry
    from asrops.settings import load_settings

    settings = load_settings()
    version_dir = ModelRegistry.from_settings(settings).fetch("stable")
    # Built as a model replica builds it (serve/model_server.py), lanes and all.
    lanes = engine_lanes(settings.engine.lanes, "cpu", "onnx-int8")
    engine = load_engine(version_dir, "onnx-int8", "cpu", job["threads"], settings.engine.short_windows, lanes)
    # What the API passes for a plain request (see serve/api.py `_options`).
    options = settings.engine.decode_options()
    clips = load_clips(max(job["order"]) + 1)
    audios = [decode_audio(clips[i].wav).samples for i in job["order"]]
    for audio in audios:  # warm-up: the service has seen every clip in the levels before
        engine.transcribe([audio], options)
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        latencies, asked = [], json.loads(line)
        for position in asked["positions"]:
            if asked["pause_s"]:
                time.sleep(asked["pause_s"])
            start = time.perf_counter()
            engine.transcribe([audios[position]], options)
            latencies.append(time.perf_counter() - start)
        print(json.dumps(latencies), flush=True)


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """Every process of the tree under `pid` stopped (SIGSTOP) and continued afterwards: for a
    second or two, nothing of the service uses the CPU."""
    import psutil

    root = psutil.Process(pid)
    stopped: list[psutil.Process] = []
    try:
        for proc in [root, *root.children(recursive=True)]:
            try:
                proc.suspend()
                stopped.append(proc)
            except psutil.NoSuchProcess:
                continue
        yield
    finally:
        for proc in stopped:
            try:
                proc.resume()
            except psutil.NoSuchProcess:
                continue


def c1_blocks(n_clips: int, passes: int) -> Iterator[tuple[list[int], int | None]]:
    """The c=1 comparison's blocks in order: positions into its clips (every clip `passes` times,
    C1_BLOCK at a time), each with the number of passes complete once it is done, or None when no
    pass ends in it."""
    total = passes * n_clips
    for first in range(0, total, C1_BLOCK):
        done = min(first + C1_BLOCK, total)
        passes_done = done // n_clips if done // n_clips > first // n_clips else None
        yield [p % n_clips for p in range(first, done)], passes_done


def measure_c1_against_bare_engine(server: RunningServer, clips: list[Clip], order: list[int], threads: int,
                                   passes: int, say: Callable[[str], None]) -> C1AgainstBareEngine | None:
    """Ours at concurrency 1 and the bare engine on the same clips, in blocks of C1_BLOCK clips:
    per block, ours one request at a time, then the bare engine beside our idle service, then
    the bare engine alone (our service paused, when it was started here), back to back and then
    paced (PACE_S before each clip). This machine's speed drifts by 15-25 % within minutes;
    within a block, seconds apart, it does not.

    Each side sends one untimed request (the block's first clip) before its timed ones. Ours
    follows the pause, which slowed its next request beyond anything a running service's clients
    meet, and one untimed request absorbs it (the probes: loadtests/RESULTS.md, "The benchmark's
    own pause"). The bare engine's first clip likewise follows ours'."""
    if httpx.get(server.url + "/readyz", timeout=10).status_code != 200:
        say("our service is not ready: ours at c=1 against the bare engine is not measured")
        return None
    alone_too = server.pid is not None
    say(f"ours at c=1 against the bare engine (onnx-int8, {threads} threads), {len(order)} clips {passes} times, "
        f"in blocks of {C1_BLOCK}: ours, the bare engine beside our idle service"
        + (", the bare engine alone (our service paused), back to back and paced" if alone_too
           else " (our service was not started here: "
           "it cannot be paused, so the bare engine alone is not measured)"))
    samples: list[Sample] = []
    beside: list[float] = []
    alone: list[float] = []
    paced: list[float] = []
    wall: Counter[str] = Counter()
    beside_cpu: Counter[str] = Counter()
    paused_cpu: Counter[str] = Counter()

    async def interleave(worker: BareEngineWorker) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            for positions, passes_done in c1_blocks(len(order), passes):
                await _post(client, server.url, clips[order[positions[0]]])  # untimed (see above)
                start = time.perf_counter()
                samples.extend([await _post(client, server.url, clips[order[p]]) for p in positions])
                wall["ours"] += time.perf_counter() - start
                worker.time_clips(positions[:1])  # untimed, as ours'
                before, start = cpu_snapshot(), time.perf_counter()
                beside.extend(worker.time_clips(positions))
                wall["beside"] += time.perf_counter() - start
                beside_cpu.update(cpu_used(before, cpu_snapshot(), exclude=worker.pid))
                if alone_too:
                    with paused(server.pid):
                        before, start = cpu_snapshot(), time.perf_counter()
                        alone.extend(worker.time_clips(positions))
                        wall["alone"] += time.perf_counter() - start
                        paused_cpu.update(cpu_used(before, cpu_snapshot(), exclude=worker.pid))
                        paced.extend(worker.time_clips(positions, PACE_S))
                    await asyncio.sleep(RESUME_SETTLE_S)
                if passes_done:
                    ours_p50 = percentile([x.latency_s for x in samples], 50)
                    say(f"  pass {passes_done}/{passes}: p50 so far ours {_fmt(ours_p50)} s, "
                        f"the bare engine alone {_fmt(percentile(alone, 50))} s")

    try:
        with bare_engine(order, threads) as worker:
            meter = StealMeter()
            asyncio.run(interleave(worker))
            steal = meter.cores()
    except RuntimeError as exc:
        say(f"the bare engine failed; reporting without it: {exc}")
        return None
    return C1AgainstBareEngine(
        ours=summarize(samples, 1, wall["ours"]),
        ours_latencies_s=[x.latency_s for x in samples],
        ours_engine_s=[x.engine_s for x in samples],
        bare_beside=_bare(beside, threads),
        bare_alone=_bare(alone, threads) if alone else None,
        stack_cpu_beside=as_cores(beside_cpu, wall["beside"]),
        stack_cpu_paused=as_cores(paused_cpu, wall["alone"]) if alone else [],
        bare_paced=_bare(paced, threads) if paced else None,
        host_steal_cores=steal,
    )


def _bare(latencies: list[float], threads: int) -> BareEngine:
    return BareEngine(threads=threads, clips=len(latencies), p50_s=percentile(latencies, 50),
                      mean_s=float(np.mean(latencies)), latencies_s=latencies)


def measure_engine_ratio(clips: int, threads: int, say: Callable[[str], None]) -> EngineRatio | None:
    """`asrops bench engine` for onnx-int8 and faster-whisper int8 (each in its own process)."""
    from asrops.benchmarks.engine_bench import PEER, run_engine_benchmark
    from asrops.errors import AsropsError

    meter = StealMeter()
    try:  # the core clips of the same speech as the levels', ASROPS_SPEECH_DATA_DIR set or not
        result = run_engine_benchmark(speech_settings(), None, "stable", ["onnx-int8", PEER], clips, threads, say)
    except (subprocess.CalledProcessError, AsropsError) as exc:
        say(f"engine benchmark failed ({exc}); reporting without it")
        return None
    ours, peer = result["engines"]["onnx-int8"], result["engines"][PEER]
    return EngineRatio(clips=result["clips"], rtfx=ours["rtfx"], peer_rtfx=peer["rtfx"],
                       peak_rss_mb=ours["peak_rss_mb"], peer_peak_rss_mb=peer["peak_rss_mb"],
                       wer=ours.get("wer"), peer_wer=peer.get("wer"),
                       host_steal_cores=meter.cores())


# --- report ------------------------------------------------------------------------------
def idle_driver_note(driver: str) -> str:
    """Which cpuidle driver the run met: without one the held bound does nothing (asrops/cpu_wakeup.py)."""
    halts = ", so idle CPUs halt regardless" if driver == NO_CPUIDLE_DRIVER else ""
    return f" (cpuidle driver: {driver}{halts})"


def stolen(cores: float | None) -> str:
    """What the hypervisor took during a loop, for the end of its line; nothing when under 1 % of a core."""
    return f"; the host took {cores:.2f} cores (steal)" if cores is not None and cores >= MIN_CPU_SHARE else ""


def steal_note(result: BenchResult) -> list[str]:
    """A line when the hypervisor took CPU from this VM in some timed loop: the figures of a loop it
    hit measure the host's other tenants as much as the server."""
    loops: dict[str, float | None] = {}
    for server in (result.ours, result.peer):
        loops.update({f"{server.name} c={r.concurrency}": r.host_steal_cores for r in server.levels})
        if server.core_set:
            loops[f"{server.name} core set"] = server.core_set.host_steal_cores
    if c1 := result.c1_against_bare_engine:
        loops["ours at c=1 against the bare engine"] = c1.host_steal_cores
    if result.engine:
        loops["the engine benchmark"] = result.engine.host_steal_cores
    hit = {name: cores for name, cores in loops.items() if cores is not None and cores >= STEAL_NOTE_CORES}
    if not hit:
        return []
    worst = max(hit, key=hit.get)
    return [f"The host took CPU from this VM (steal) during {len(hit)} of {len(loops)} timed parts, up to "
            f"{hit[worst]:.2f} cores ({worst}): figures from those parts measure the host's other tenants too"]


def format_table(result: BenchResult) -> str:
    lines = [("CPU wake-up latency left to the machine" if result.cpu_wakeup_latency_us is None else
              f"CPU wake-up latency held at {result.cpu_wakeup_latency_us} us") + " for every server and engine below"
             + (idle_driver_note(result.cpuidle_driver) if result.cpuidle_driver else ""),
             *steal_note(result),
             f"{'server':6} {'conc':>4} {'req':>4} {'err':>4} {'audio-s/s':>9} {'req/s':>6} "
             f"{'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>5} {'WER %':>6}"]
    for server in (result.ours, result.peer):
        for r in server.levels:
            lines.append(f"{server.name:6} {r.concurrency:4d} {r.requests:4d} {r.errors:4d} {r.throughput:9.2f} "
                         f"{r.requests_per_s:6.2f} {_fmt(r.p50_s):>7} {_fmt(r.p95_s):>7} {_fmt(r.p99_s):>7} "
                         f"{_fmt(r.mean_batch_size, '.1f'):>5} {_fmt(r.wer, '.2f'):>6}")
    lines.append("")
    lines.append(f"{'ours/peer':9} {'conc':>4} {'throughput':>10} {'p50':>6} {'p95':>6} {'p99':>6}  goal")
    for q in result.ratios:
        goal = THROUGHPUT_GOALS.get(q.concurrency)
        verdict = "" if goal is None or q.throughput is None else (
            f"throughput >= {goal}: {'meets' if q.throughput >= goal else 'MISSES'}")
        lines.append(f"{'':9} {q.concurrency:4d} {_fmt(q.throughput, '.2f'):>10} {_fmt(q.p50, '.2f'):>6} "
                     f"{_fmt(q.p95, '.2f'):>6} {_fmt(q.p99, '.2f'):>6}  {verdict}")
    lines.append("")
    lines.append("CPU during each timed loop (cores = CPU s / wall s; processes under 1 % left out):")
    for server in (result.ours, result.peer):
        for r in server.levels:
            used = ", ".join(f"{c.process} {c.cores:.2f}" for c in r.cpu) or "-"
            lines.append(f"  {server.name} c={r.concurrency}: {used}{stolen(r.host_steal_cores)}")
    lines.append("")
    if (ours := result.ours.core_set) and (peer := result.peer.core_set):
        lines.append(f"core set ({ours.requests} clips, once each, c={ours.concurrency}): WER ours "
                     f"{_fmt(ours.wer, '.2f')} % / peer {_fmt(peer.wer, '.2f')} %; throughput "
                     f"{ours.throughput:.2f} / {peer.throughput:.2f} audio-s/s = "
                     f"{_fmt(ratio(ours.throughput, peer.throughput), '.2f')}; errors {ours.errors} / {peer.errors}"
                     + (f"; the host took {_fmt(ours.host_steal_cores, '.2f')} / {_fmt(peer.host_steal_cores, '.2f')} "
                        "cores (steal)" if stolen(ours.host_steal_cores) or stolen(peer.host_steal_cores) else ""))
    if c1 := result.c1_against_bare_engine:
        head = (f"ours at c=1 against the bare engine on the same clips ({c1.ours.requests} requests), interleaved in "
                f"blocks of {C1_BLOCK}: ours p50 {_fmt(c1.ours.p50_s)} s (the engine in its replica "
                f"{_fmt(c1.ours.engine_p50_s)} s, serving around it {_fmt(c1.ours.serving_p50_s)} s)")
        if c1.bare_alone:
            verdict = "meets" if c1.overhead <= result.overhead_target else "MISSES"
            lines.append(f"{head} / bare engine alone p50 {c1.bare_alone.p50_s:.3f} s = {c1.overhead:.2f} "
                         f"({verdict} target <= {result.overhead_target})")
        else:
            lines.append(f"{head}; the bare engine alone: not measured (our service was not started here)")
        used = ", ".join(f"{c.process} {c.cores:.2f}" for c in c1.stack_cpu_beside) or "-"
        lines.append(f"  the bare engine beside our idle service: p50 {c1.bare_beside.p50_s:.3f} s"
                     + (f" = {_fmt(ratio(c1.bare_beside.p50_s, c1.bare_alone.p50_s), '.2f')} x alone" if c1.bare_alone
                        else "")
                     + f"; the idle stack used {sum(c.cores for c in c1.stack_cpu_beside):.2f} cores ({used})")
        if c1.bare_alone:
            used = ", ".join(f"{c.process} {c.cores:.2f}" for c in c1.stack_cpu_paused) or "nothing over 1 %"
            lines.append(f"  while our service was paused for the bare engine alone, the rest of the machine used "
                         f"{sum(c.cores for c in c1.stack_cpu_paused):.2f} cores ({used})")
        if c1.bare_alone and c1.bare_paced:
            lines.append(f"  the bare engine alone, paced like a server ({PACE_S * 1000:.0f} ms of sleep before each "
                         f"clip): p50 {c1.bare_paced.p50_s:.3f} s = "
                         f"{_fmt(ratio(c1.bare_paced.p50_s, c1.bare_alone.p50_s), '.2f')} x back to back; ours / it "
                         f"{_fmt(ratio(c1.ours.p50_s, c1.bare_paced.p50_s), '.2f')} (for reading only: the goal is "
                         "against the bare engine back to back)")
        if stolen(c1.host_steal_cores):
            lines.append(f"  the host took {c1.host_steal_cores:.2f} cores (steal) during these blocks")
    else:
        lines.append("ours at c=1 against the bare engine: not measured")
    if e := result.engine:
        lines.append(
            f"engine ({e.clips} clips): onnx-int8 RTFx {e.rtfx:.2f} / fw-int8 {e.peer_rtfx:.2f} = {e.rtfx_ratio:.2f} "
            f"({'meets' if e.rtfx_ratio >= ENGINE_GOALS['rtfx'] else 'MISSES'} >= {ENGINE_GOALS['rtfx']}); peak RSS "
            f"{e.peak_rss_mb:.0f} / {e.peer_peak_rss_mb:.0f} MB = {e.rss_ratio:.2f} "
            f"({'meets' if e.rss_ratio <= ENGINE_GOALS['peak_rss'] else 'MISSES'} <= {ENGINE_GOALS['peak_rss']}); "
            f"WER {_fmt(e.wer, '.2f')} / {_fmt(e.peer_wer, '.2f')} %{stolen(e.host_steal_cores)}")
    else:
        lines.append("engine ratio: not measured")
    lines.append(f"({result.clips} clips, {result.clip_audio_s:.0f} s of audio; throughput = audio s / wall s; "
                 "latencies over answered requests)")
    return "\n".join(lines)


def plot(result: BenchResult, path: Path) -> None:
    """Throughput and p50/p95 latency against concurrency, ours vs peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = lambda v: np.nan if v is None else v  # noqa: E731 - gaps for levels with no answers
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server, color in ((result.ours, "tab:blue"), (result.peer, "tab:orange")):
        cs = [r.concurrency for r in server.levels]
        left.plot(cs, [r.throughput for r in server.levels], "o-", color=color, label=server.name)
        right.plot(cs, [nan(r.p50_s) for r in server.levels], "o-", color=color, label=f"{server.name} p50")
        right.plot(cs, [nan(r.p95_s) for r in server.levels], "s--", color=color, label=f"{server.name} p95")
    if (c1 := result.c1_against_bare_engine) and c1.bare_alone:
        right.axhline(c1.bare_alone.p50_s, color="gray", linestyle=":", label="bare engine p50")
    for ax, ylabel in ((left, "audio seconds / wall second"), (right, "latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result.levels, labels=[str(c) for c in result.levels])
        ax.set(xlabel="concurrent clients", ylabel=ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title("Throughput")
    right.set_title("Latency")
    fig.suptitle(f"asrops vs one-at-a-time faster-whisper ({result.clips} clips)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- CLI ---------------------------------------------------------------------------------
@contextmanager
def measure_on_one_machine_state(say: Callable[[str], None]) -> Iterator[tuple[int | None, str]]:
    """The CPU wake-up latency bound our model replicas hold (`serve.cpu_wakeup_latency_us`,
    asrops/cpu_wakeup.py), held here too for the whole run, so that the peer and both engine
    benchmarks meet the machine our service makes: with idle CPUs polling, every server's
    wake-ups are cheaper, not only ours. Yields the bound (None when none is held) and the kernel's
    cpuidle driver, read once for the run's log and its record."""
    from asrops.cpu_wakeup import cpu_wakeup_latency_held
    from asrops.settings import load_settings

    bound, driver = load_settings().serve.cpu_wakeup_latency_us, cpuidle_driver()
    with cpu_wakeup_latency_held(bound) as held:
        if held:
            say(f"CPU wake-up latency held at {bound} us for the whole run, for the peer and the engines as for ours"
                + idle_driver_note(driver))
        else:
            say("CPU wake-up latency left to the machine for the whole run" + idle_driver_note(driver))
        yield (bound if held else None), driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked before anything starts."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.service_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", help="base URL of a running asrops (default: start one)")
    parser.add_argument("--peer", help="base URL of a running peer (default: start loadtests.peer_server)")
    parser.add_argument("--clips", type=int, default=40, help="first N core English clips (default 40)")
    parser.add_argument("--levels", default="1,4,16", help="concurrency levels (default 1,4,16)")
    parser.add_argument("--requests-per-level", type=int, help="timed requests per level (default max(4c, 24))")
    parser.add_argument("--threads", type=int, default=2, help="threads of the peer and the bare engine")
    parser.add_argument("--wer-clips", type=int, default=245,
                        help="core clips each server transcribes once more, untimed by level, for its WER (0 skips it)")
    parser.add_argument("--engine-clips", type=int, default=245,
                        help="core clips for the engine ratio (asrops bench engine, onnx-int8 vs fw-int8); 0 skips it")
    parser.add_argument("--c1-passes", type=int, default=C1_PASSES,
                        help=f"times each c=1 clip is timed each way against the bare engine (default {C1_PASSES})")
    parser.add_argument("--out-dir", type=Path, default=Path("out/service-bench"))
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a started server")
    parser.add_argument("--bare-engine-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.c1_passes < 1:
        parser.error("--c1-passes must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.bare_engine_worker:
        return _bare_engine_worker(json.loads(args.bare_engine_worker))

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    levels = [int(c) for c in args.levels.split(",")]
    try:
        loaded = load_clips(max(args.clips, args.wer_clips))  # the levels' clips open the core set
        clips, core_set = loaded[: args.clips], loaded[: args.wer_clips]
    except FileNotFoundError as exc:
        sys.exit(str(exc))
    if not clips:
        sys.exit("No core English clips found in the speech manifest.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    say(f"{len(clips)} clips ({sum(c.audio_s for c in clips):.0f} s of audio), levels {levels}")

    py = sys.executable
    c1_order = [level_clip(i, len(clips)) for i in range(args.requests_per_level or default_requests(1))]
    with measure_on_one_machine_state(say) as (wakeup_us, idle_driver):
        with running_server(args.ours, [py, "-m", "asrops.cli", "serve"], "/readyz",
                            args.out_dir / "ours.log", args.startup_timeout, say) as server:
            ours = bench_server("ours", server.url, clips, levels, args.requests_per_level, core_set, say)
            c1 = measure_c1_against_bare_engine(server, clips, c1_order, args.threads, args.c1_passes, say)
        with running_server(args.peer, [py, "-m", "loadtests.peer_server", "--threads", str(args.threads)],
                            "/healthz", args.out_dir / "peer.log", args.startup_timeout, say) as server:
            peer = bench_server("peer", server.url, clips, levels, args.requests_per_level, core_set, say)
        engine = measure_engine_ratio(args.engine_clips, args.threads, say) if args.engine_clips else None

    result = BenchResult(
        cpu_wakeup_latency_us=wakeup_us,
        cpuidle_driver=idle_driver,
        clips=len(clips),
        clip_audio_s=sum(c.audio_s for c in clips),
        levels=levels,
        ours=ours,
        peer=peer,
        ratios=compare(ours, peer),
        c1_against_bare_engine=c1,
        engine=engine,
    )
    print(format_table(result))
    (args.out_dir / "service_bench.json").write_text(result.model_dump_json(indent=2))
    plot(result, args.out_dir / "service_bench.png")
    say(f"wrote {args.out_dir / 'service_bench.json'} and {args.out_dir / 'service_bench.png'}")


if __name__ == "__main__":
    main()
