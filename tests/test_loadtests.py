"""The service benchmark's statistics, where its speech comes from, and the peer server's
one-request-at-a-time rule (with a fake transcriber and a fake engine benchmark: no servers), and
the bare engine's worker (the real model)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from asrops.audio import audio_to_wav_bytes
from asrops.formats import engine_time, server_timing
from loadtests.peer_server import build_app
from loadtests.service_bench import (
    C1_BLOCK,
    BareEngine,
    BenchResult,
    C1AgainstBareEngine,
    LevelResult,
    ProcessCpu,
    Sample,
    ServerResult,
    StealMeter,
    c1_blocks,
    compare,
    cpu_by_process,
    cpu_snapshot,
    default_requests,
    format_table,
    host_steal_s,
    parse_args,
    paused,
    percentile,
    process_label,
    ratio,
    steal_cores,
    summarize,
)


def test_percentile_interpolates_and_handles_empty():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_ratio_handles_missing_and_zero():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_summarize_counts_only_answered_requests():
    samples = [
        Sample(1.0, 200, 10.0, 2, "the cat sat down", "The cat sat down."),
        Sample(2.0, 200, 5.0, 4, "a dog ran", "a dog ran"),
        Sample(3.0, 200, 15.0, None, "red blue", "red green"),
        Sample(9.0, 503, 20.0, None, "not answered at all", None),
        Sample(0.1, 0, 20.0),
    ]
    r = summarize(samples, concurrency=4, wall_s=10.0)
    assert (r.requests, r.errors) == (5, 2)
    assert r.error_statuses == {"503": 1, "0": 1}
    assert r.audio_s == 30.0
    assert r.throughput == pytest.approx(3.0)  # 30 audio s in 10 wall s
    assert r.requests_per_s == pytest.approx(0.3)
    assert r.p50_s == pytest.approx(2.0)
    assert r.p95_s == pytest.approx(2.9)
    assert r.mean_batch_size == pytest.approx(3.0)
    assert r.wer == pytest.approx(100 / 9)  # one word wrong in the 9 of the answered requests


def test_the_engine_time_of_each_answer_splits_its_latency():
    assert engine_time(server_timing(0.1235)) == pytest.approx(0.1235)  # what the API writes, read back
    assert engine_time("engine;dur=123.5") == pytest.approx(0.1235)
    assert engine_time("db;dur=3, engine;desc=\"model\";dur=40") == pytest.approx(0.040)
    assert engine_time("") is None and engine_time("total;dur=5") is None and engine_time("engine;dur=x") is None
    samples = [Sample(0.30, 200, 5.0, 1, engine_s=0.22), Sample(0.50, 200, 5.0, 1, engine_s=0.45),
               Sample(0.40, 200, 5.0, 1, engine_s=0.30), Sample(9.0, 503, 5.0)]
    r = summarize(samples, concurrency=1, wall_s=2.0)
    assert r.engine_p50_s == pytest.approx(0.30)
    assert r.serving_p50_s == pytest.approx(0.08)  # of 0.08, 0.05 and 0.10: per request, not p50 - p50
    assert summarize(samples[:1] + [Sample(0.2, 200, 1.0)], 1, 1.0).engine_p50_s == pytest.approx(0.22)


def test_summarize_all_failed():
    r = summarize([Sample(1.0, 500, 4.0)], concurrency=1, wall_s=1.0)
    assert (r.errors, r.throughput, r.p50_s, r.mean_batch_size) == (1, 0.0, None, None)


def _level(c: int, throughput: float, p50: float | None) -> LevelResult:
    return LevelResult(concurrency=c, requests=10, errors=0, wall_s=1.0, audio_s=throughput,
                       throughput=throughput, requests_per_s=10.0, p50_s=p50, p95_s=p50, p99_s=p50)


def test_compare_is_ours_over_peer_at_shared_levels():
    ours = ServerResult(name="ours", url="", levels=[_level(1, 10.0, 0.5), _level(4, 40.0, 1.0), _level(16, 1.0, None)])
    peer = ServerResult(name="peer", url="", levels=[_level(1, 20.0, 0.25), _level(4, 20.0, 2.0)])
    ratios = compare(ours, peer)
    assert [q.concurrency for q in ratios] == [1, 4]
    assert (ratios[0].throughput, ratios[0].p50) == (0.5, 2.0)
    assert (ratios[1].throughput, ratios[1].p50, ratios[1].p99) == (2.0, 0.5, 0.5)


def test_the_table_splits_the_c1_overhead_into_the_idle_stack_and_serving():
    ours_c1 = _level(1, 10.0, 0.30).model_copy(update={"engine_p50_s": 0.26, "serving_p50_s": 0.04})
    ours = ServerResult(name="ours", url="", levels=[ours_c1])
    peer = ServerResult(name="peer", url="", levels=[_level(1, 8.0, 0.25)])

    def bare(p50: float) -> BareEngine:
        return BareEngine(threads=2, clips=3, p50_s=p50, mean_s=p50, latencies_s=[p50] * 3)

    stack = [ProcessCpu(process="ray::ServeController", cpu_s=1.0, cores=0.05),
             ProcessCpu(process="gcs_server", cpu_s=0.4, cores=0.02)]
    c1 = C1AgainstBareEngine(ours=ours_c1, ours_latencies_s=[0.3] * 3, ours_engine_s=[0.26] * 3,
                             bare_beside=bare(0.24), bare_alone=bare(0.20), stack_cpu_beside=stack,
                             stack_cpu_paused=[ProcessCpu(process="benchmark client", cpu_s=0.1, cores=0.01)])
    result = BenchResult(clips=1, clip_audio_s=5.0, levels=[1], ours=ours, peer=peer, ratios=compare(ours, peer),
                         c1_against_bare_engine=c1)
    table = format_table(result)
    assert "ours p50 0.300 s (the engine in its replica 0.260 s, serving around it 0.040 s)" in table
    assert "bare engine alone p50 0.200 s = 1.50 (MISSES target <= 1.15)" in table
    assert "beside our idle service: p50 0.240 s = 1.20 x alone; the idle stack used 0.07 cores" in table
    assert "ray::ServeController 0.05, gcs_server 0.02" in table
    assert "our service was paused for the bare engine alone, the rest of the machine used 0.01 cores" in table
    assert "paced like a server" not in table  # not measured: not said
    paced = format_table(result.model_copy(update={"c1_against_bare_engine": c1.model_copy(
        update={"bare_paced": bare(0.25)})}))
    assert ("the bare engine alone, paced like a server (10 ms of sleep before each clip): p50 0.250 s = 1.25 x back "
            "to back; ours / it 1.20") in paced
    assert "bare engine alone p50 0.200 s = 1.50 (MISSES target <= 1.15)" in paced  # the goal's yardstick stays
    unpaused = format_table(result.model_copy(update={"c1_against_bare_engine": c1.model_copy(
        update={"bare_alone": None, "stack_cpu_paused": []})}))
    assert "the bare engine alone: not measured (our service was not started here)" in unpaused
    assert "MISSES" not in unpaused and "meets target" not in unpaused and "x alone" not in unpaused


def test_the_table_says_when_the_held_wake_up_latency_has_no_effect():
    """A run on a kernel without a cpuidle driver held the bound for nothing: the first line says so."""
    level = _level(1, 10.0, 0.3)
    result = BenchResult(clips=1, clip_audio_s=5.0, levels=[1], ours=ServerResult(name="ours", url="", levels=[level]),
                         peer=ServerResult(name="peer", url="", levels=[level]), ratios=[], c1_against_bare_engine=None,
                         cpu_wakeup_latency_us=0, cpuidle_driver="none")
    assert format_table(result).splitlines()[0] == (
        "CPU wake-up latency held at 0 us for every server and engine below (cpuidle driver: none, so idle CPUs "
        "halt regardless)")
    polled = format_table(result.model_copy(update={"cpuidle_driver": "haltpoll"})).splitlines()[0]
    assert polled.endswith("(cpuidle driver: haltpoll)")


def test_the_table_says_which_loops_the_host_took_cpu_from():
    """CPU steal moves a loop's figures as much as a server does: the report names the loops it hit
    and warns in its second line from STEAL_NOTE_CORES; a run on a quiet host says nothing of it."""

    def server(name: str, *steals: float | None) -> ServerResult:
        levels = [_level(c, 10.0, 0.3).model_copy(update={"host_steal_cores": steal})
                  for c, steal in zip((1, 4), steals, strict=True)]
        return ServerResult(name=name, url="", levels=levels)

    result = BenchResult(clips=1, clip_audio_s=5.0, levels=[1, 4], ours=server("ours", 0.0, 0.02),
                         peer=server("peer", 0.41, 0.07), ratios=[], c1_against_bare_engine=None)
    lines = format_table(result).splitlines()
    assert lines[1] == ("The host took CPU from this VM (steal) during 2 of 4 timed parts, up to 0.41 cores "
                        "(peer c=1): figures from those parts measure the host's other tenants too")
    cpu = {line.split(":")[0].strip(): line for line in lines if line.startswith("  ")}
    assert cpu["ours c=1"].endswith(": -")  # under 1 % of a core: not said
    assert cpu["ours c=4"].endswith("; the host took 0.02 cores (steal)")
    assert cpu["peer c=1"].endswith("; the host took 0.41 cores (steal)")
    under = format_table(result.model_copy(update={"peer": server("peer", 0.04, None)}))
    assert "The host took" not in under and "the host took 0.04 cores (steal)" in under  # listed, no warning
    assert "steal" not in format_table(result.model_copy(update={"ours": server("ours", None, 0.0),
                                                                  "peer": server("peer", 0.001, None)}))


def test_steal_is_read_from_the_kernel_and_turned_into_cores():
    assert steal_cores(10.0, 11.5, wall_s=3.0) == 0.5
    assert steal_cores(None, 1.0, wall_s=3.0) is None and steal_cores(1.0, 2.0, wall_s=0.0) is None
    if os.path.exists("/proc/stat"):  # Linux counts it for every machine, virtual or not
        first = host_steal_s()
        assert isinstance(first, float) and 0 <= first <= host_steal_s()
        meter = StealMeter()
        time.sleep(0.2)
        cores = meter.cores()  # cores over the part, never more than the machine has
        assert isinstance(cores, float) and 0 <= cores <= os.cpu_count()


def test_a_paused_service_uses_no_cpu_until_it_is_resumed():
    """The bare engine's 'alone' timing pauses the whole process tree of our service: a process
    and the child it started, both spinning, use no CPU while paused and spin again after."""
    import subprocess
    import sys

    import psutil

    spin = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'while True: pass']); \nwhile True: pass"
    parent = subprocess.Popen([sys.executable, "-c", spin])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children()]
        assert len(tree) == 2

        def cpu_over(seconds: float) -> list[float]:
            before = [sum(p.cpu_times()[:2]) for p in tree]
            time.sleep(seconds)
            return [sum(p.cpu_times()[:2]) - b for p, b in zip(tree, before, strict=True)]

        with paused(parent.pid):
            time.sleep(0.1)  # a tick already counted
            assert all(used < 0.02 for used in cpu_over(0.5))
        assert all(used > 0.05 for used in cpu_over(0.5))
    finally:
        for proc in psutil.Process(parent.pid).children():
            proc.kill()
        parent.kill()
        parent.wait()


def test_cpu_is_summed_by_process_kind_and_idle_ones_left_out():
    before = {1: ("ray::ServeReplica:asrops:ingress", 10.0), 2: ("raylet", 5.0), 3: ("prometheus", 1.0)}
    after = {1: ("ray::ServeReplica:asrops:ingress", 12.0), 2: ("raylet", 5.01), 3: ("prometheus", 1.5),
             4: ("ray::ServeReplica:asrops:ingress", 1.0)}  # a second replica, born during the loop
    used = cpu_by_process(before, after, wall_s=2.0)
    assert [(c.process, c.cpu_s, c.cores) for c in used] == [("ray::ServeReplica:asrops:ingress", 3.0, 1.5),
                                                            ("prometheus", 0.5, 0.25)]  # raylet: 0.5 % of a core
    assert process_label("python3", ["ray::ServeReplica:model-v1:model", ""]) == "ray::ServeReplica:model-v1:model"
    assert process_label("python3", ["/usr/bin/python3", "-m", "asrops.cli", "monitor"]) == "drift monitor"
    assert process_label("prometheus", ["prometheus", "--config.file=x"]) == "prometheus"
    label, cpu = cpu_snapshot()[os.getpid()]
    assert cpu > 0 and label


@pytest.mark.parametrize("n_clips, passes", [(24, 6), (10, 3), (3, 2), (5, 1)])
def test_the_c1_blocks_time_every_clip_as_often_and_mark_each_pass_once(n_clips, passes):
    """The goal's two p50s are only comparable when both sides saw every clip equally often;
    the progress line needs each pass's end, also where a pass ends inside a block."""
    blocks = list(c1_blocks(n_clips, passes))
    positions = [p for block, _ in blocks for p in block]
    assert positions == [p % n_clips for p in range(n_clips * passes)]
    assert all(1 <= len(block) <= C1_BLOCK for block, _ in blocks)
    assert [done for _, done in blocks if done] == list(range(1, passes + 1))
    assert blocks[-1][1] == passes


def test_the_benchmark_refuses_a_c1_comparison_of_no_passes(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--c1-passes", "0"])
    assert stopped.value.code == 2 and "--c1-passes must be at least 1" in capsys.readouterr().err


def test_default_requests_grow_with_concurrency():
    assert [default_requests(c) for c in (1, 4, 16, 32)] == [24, 24, 64, 128]


def test_peer_answers_one_request_at_a_time():
    """Four requests sent together: the fake transcriber's calls never overlap."""
    active, spans, guard = 0, [], threading.Lock()
    peak = 0

    def slow_transcribe(samples: np.ndarray) -> str:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        start = time.perf_counter()
        time.sleep(0.2)
        with guard:
            active -= 1
            spans.append((start, time.perf_counter()))
        return f"{samples.size} samples"

    wav = audio_to_wav_bytes(np.zeros(1600, np.float32))
    with TestClient(build_app(slow_transcribe)) as client:
        def post(_):
            return client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav, "audio/wav")},
                               data={"model": "whisper-1"})

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(post, range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.json() == {"text": "1600 samples"} for r in responses)
    assert peak == 1
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_peer_health_and_bad_audio():
    with TestClient(build_app(lambda samples: "unused")) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"not audio", "audio/wav")})
        assert r.status_code == 400
        assert r.json()["error"]["message"]


def test_a_profile_counts_own_time_per_function_per_request():
    from loadtests.profile_request import RATE_HZ, summarise

    collapsed = "\n".join([
        "process 12 (ray::ServeReplica);thread 1;_run (lanes.py:80);run (onnx_backend.py:70) 150",
        "process 12 (ray::ServeReplica);thread 1;_run (lanes.py:80) 30",
        "process 12 (ray::ServeReplica);thread 1;_run (lanes.py:80);run (onnx_backend.py:70) 50",
        "not a sample line",
    ])
    profile = summarise("model", 12, collapsed, requests=10)
    per_sample_ms = 1000 / RATE_HZ / 10
    assert profile.samples == 230
    assert profile.cpu_ms_per_request == round(230 * per_sample_ms, 1)
    assert profile.top_functions == [("run (onnx_backend.py:70)", round(200 * per_sample_ms, 2)),
                                     ("_run (lanes.py:80)", round(30 * per_sample_ms, 2))]


def test_the_bare_engine_times_each_clip_without_the_pause_before_it(monkeypatch, data_dir, speech_dir):
    """The worker the c=1 comparison times (a process of its own, the stable version's engine):
    back to back, and paced, where the pause before each clip is slept but not counted."""
    from loadtests.service_bench import bare_engine

    monkeypatch.setenv("ASROPS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ASROPS_SPEECH_DATA_DIR", str(speech_dir))
    with bare_engine([0, 1], threads=2) as worker:
        back_to_back = worker.time_clips([0, 1])
        start = time.perf_counter()
        paced = worker.time_clips([1, 0], pause_s=0.2)
        elapsed = time.perf_counter() - start
    assert len(back_to_back) == len(paced) == 2
    assert all(0 < s < 30 for s in back_to_back + paced)
    assert elapsed >= sum(paced) + 2 * 0.2  # both pauses were slept, and not counted in the clips' times


def test_the_engine_benchmark_reads_the_checkouts_speech_without_the_variable(monkeypatch):
    """`python -m loadtests.service_bench` as the README runs it, with no ASROPS_SPEECH_DATA_DIR:
    its levels read the speech beside the checkout, and so must the engine benchmark it runs (it
    once reported 'no speech data' and printed no engine ratio)."""
    import asrops.benchmarks.engine_bench as engine_bench
    from loadtests import CHECKOUT_SPEECH
    from loadtests.service_bench import measure_engine_ratio

    if not (CHECKOUT_SPEECH / "manifest.jsonl").exists():
        pytest.skip(f"no speech data beside the checkout ({CHECKOUT_SPEECH})")
    monkeypatch.delenv("ASROPS_SPEECH_DATA_DIR", raising=False)
    seen = {}

    def engine_benchmark(settings, manifest, version, engines, limit, threads, say):
        seen["manifest"] = settings.speech_manifest if manifest is None else manifest
        one = {"rtfx": 2.0, "peak_rss_mb": 400.0, "wer": 6.0}
        return {"clips": limit, "engines": {name: one for name in engines}}

    monkeypatch.setattr(engine_bench, "run_engine_benchmark", engine_benchmark)
    said = []
    result = measure_engine_ratio(5, 2, said.append)
    assert seen["manifest"] == CHECKOUT_SPEECH / "manifest.jsonl", said
    assert result is not None and result.clips == 5


def test_an_operators_speech_directory_wins_over_the_checkouts(monkeypatch, tmp_path):
    from loadtests import speech_settings

    monkeypatch.setenv("ASROPS_SPEECH_DATA_DIR", str(tmp_path))
    assert speech_settings().speech_data_dir == tmp_path
