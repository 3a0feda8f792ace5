"""Ray's background processes get a lower priority than the request path: which processes
that is, found in a process tree shaped like a local cluster's (fake processes, no Ray), and
that every thread of each is lowered; and Serve's actors' task loops alone go to the idle policy.
Also Ray's settings for a replica: its messages and its stderr."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from asrops.priority import lower_processes
from asrops.raycluster import RAY_TUNING, idle_task_loop, ray_background_processes, serve_actor_processes

SLEEPER = ("import threading, time\n"
           "[threading.Thread(target=time.sleep, args=(120,)).start() for _ in range(3)]\n"
           "time.sleep(120)")

FAKE_DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    raylet_exe, sleeper = sys.argv[1], sys.argv[2]
    def spawn(argv0, code, exe=sys.executable):
        return subprocess.Popen([argv0, "-c", code], executable=exe)
    workers = ["ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ServeController.listen_for_change",
               "ray::ServeReplica:model-v1:model", "ray::ProxyActor", "ray::IDLE"]
    raylet_code = "import subprocess, time\\n" + "".join(
        f"subprocess.Popen([{w!r}, '-c', {sleeper!r}], executable={sys.executable!r})\\n" for w in workers
    ) + "time.sleep(120)"
    spawn("raylet", raylet_code, exe=raylet_exe)
    spawn("gcs_server", "import subprocess, time\\nsubprocess.Popen(['dashboard-head', '-c', "
          + repr(sleeper) + f"], executable={sys.executable!r})\\ntime.sleep(120)")
    time.sleep(120)
""")


@pytest.fixture
def fake_cluster(tmp_path):
    """A driver whose children look like a local Ray cluster's: a `raylet` (by executable name)
    with agents, a Serve controller, a replica, the proxy and an idle worker under it; a GCS with
    a child of its own."""
    raylet_exe = tmp_path / "raylet"
    raylet_exe.symlink_to(sys.executable)
    driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER, str(raylet_exe), SLEEPER])
    try:
        process = psutil.Process(driver.pid)
        deadline = time.monotonic() + 30
        while sum(_threads(p) >= 4 for p in process.children(recursive=True)) < 7:  # every sleeper up
            assert time.monotonic() < deadline, "the fake cluster did not start"
            time.sleep(0.1)
        yield process
    finally:
        for child in psutil.Process(driver.pid).children(recursive=True):
            child.kill()
        driver.kill()
        driver.wait()


def _threads(process: psutil.Process) -> int:
    try:
        return process.num_threads()
    except psutil.Error:
        return 0


def _title(process: psutil.Process) -> str:
    return " ".join(process.cmdline()).split(" -c ")[0]


def test_ray_background_processes_leave_out_the_raylet_and_every_worker_that_can_serve(fake_cluster):
    found = {_title(p) for p in ray_background_processes(fake_cluster)}
    assert found == {"gcs_server", "dashboard-head", "ray::DashboardAgent", "ray::RuntimeEnvAgent",
                     "ray::ServeController.listen_for_change"}


def test_every_thread_is_lowered_and_a_lower_one_stays(fake_cluster):
    processes = ray_background_processes(fake_cluster)
    controller = next(p for p in processes if "ServeController" in _title(p))
    already = controller.threads()[-1].id
    os.setpriority(os.PRIO_PROCESS, already, 15)
    threads = [t.id for p in processes for t in p.threads()]
    assert len(threads) == 1 + 4 * 4  # the GCS stand-in's one; a main thread and three more in the others
    assert lower_processes(processes, 7) == len(threads) - 1
    assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads if t != already} == {7}
    assert os.getpriority(os.PRIO_PROCESS, already) == 15
    serving = [p for p in fake_cluster.children(recursive=True) if p not in processes]
    assert {os.getpriority(os.PRIO_PROCESS, t.id) for p in serving for t in p.threads()} == {0}


def test_serves_actors_task_loops_go_to_the_idle_policy_and_nothing_else_does(fake_cluster):
    """Ray's task loop is an actor process's main thread: that thread alone of Serve's controller,
    proxy and replicas goes to SCHED_IDLE; their other threads (a replica's event loop, the
    engine's) and every other process keep the normal policy."""
    actors = serve_actor_processes(fake_cluster)
    assert {_title(p) for p in actors} == {"ray::ServeController.listen_for_change", "ray::ProxyActor",
                                           "ray::ServeReplica:model-v1:model"}
    assert all(idle_task_loop(p.pid) for p in actors)
    assert not any(idle_task_loop(p.pid) for p in actors)  # already idle
    policies = {t.id: os.sched_getscheduler(t.id) for p in fake_cluster.children(recursive=True) for t in p.threads()}
    assert {t for t, policy in policies.items() if policy == os.SCHED_IDLE} == {p.pid for p in actors}
    assert set(policies.values()) == {os.SCHED_IDLE, os.SCHED_OTHER}


def test_a_replicas_warnings_reach_its_own_stderr_when_serve_points_stderr_at_a_file(monkeypatch, capfd):
    """With Serve's logs off stderr (RAY_TUNING), Serve points a replica's sys.stderr at its log
    file; our warnings must still reach the process's real stderr (which Ray ships to the console)."""
    import io
    import logging

    from asrops.serve.ray_shims import warnings_to_console

    assert RAY_TUNING["RAY_SERVE_LOG_TO_STDERR"] == "0"
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    warnings_to_console()  # stderr not redirected: nothing to do
    assert root.handlers == []
    serve_file = io.StringIO()
    monkeypatch.setattr(sys, "stderr", serve_file)
    warnings_to_console()
    warnings_to_console()  # once only
    logging.getLogger("asrops.serve.model_server").warning("batch of 2 failed")
    logging.getLogger("asrops.serve.model_server").info("model ready")
    err = capfd.readouterr().err
    assert err.count("batch of 2 failed") == 1 and "model ready" not in err


def test_the_longest_audio_a_setting_can_allow_fits_serves_hop_to_a_model_replica():
    """The ingress sends a model replica the whole request at once, so Serve's gRPC message limit
    (MODEL_REQUEST_MAX_BYTES) must hold the longest audio a setting may allow (its request's
    pickled size, with the default longest prompt), and a longer setting is refused."""
    import pickle

    import numpy as np
    from pydantic import ValidationError

    from asrops.audio_format import LONGEST_AUDIO_S, SAMPLE_RATE
    from asrops.engines.types import DecodeOptions
    from asrops.serve.model_server import ModelRequest
    from asrops.settings import AudioSettings, ServeSettings

    limit = int(RAY_TUNING["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])
    minute = ModelRequest(pcm16=np.zeros(60 * SAMPLE_RATE, np.int16),
                          options=DecodeOptions(prompt="é" * ServeSettings().max_prompt_chars))
    per_minute = len(pickle.dumps(minute))
    assert per_minute * LONGEST_AUDIO_S / 60 < limit
    assert AudioSettings(max_duration_s=LONGEST_AUDIO_S).max_duration_s == LONGEST_AUDIO_S
    with pytest.raises(ValidationError):
        AudioSettings(max_duration_s=LONGEST_AUDIO_S + 1)
