"""Canary routing on the running service (real Ray Serve): weighted sticky split, and canaries
that raise or hang answered by the stable with zero client-visible errors.

The canaries here are small Serve deployments that stand in for a second model version
(one that echoes, one that raises, one that hangs): a broken Whisper cannot be made on
demand, and a second real model would only slow the test. The routing, fallback and
breakers under test are the product's, in the real ingress.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import signal
import time

import httpx
import pytest
from ray import serve

from asrops.errors import RolloutRefusedError
from asrops.promotion import rollout
from asrops.registry import ModelRegistry
from asrops.settings import Settings
from tests.conftest import ADMIN_HEADERS as ADMIN
from tests.conftest import ADMIN_TOKEN, stable_replica_pid
from tests.fakes import QUIET, FakeVersion, SteadyLoad, publish_dummy, wait_routable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(service, data_dir) -> ModelRegistry:
    return ModelRegistry.from_settings(Settings(data_dir=data_dir))


@pytest.fixture
def canary(service, registry, tmp_path):
    """Deploy a fake version as canary: `canary(behaviour, weight)` → its version id.
    Afterwards: rolled back, its application deleted, and the ingress back to stable only."""
    deployed = []

    def make(behaviour: str, weight: int) -> str:
        version = f"test-{behaviour}-v1"
        publish_dummy(registry, version, tmp_path)
        serve.run(FakeVersion.bind(version, behaviour), name=f"model-{version}", route_prefix=None)
        deployed.append(version)
        wait_routable(service, version) if behaviour == "echo" else time.sleep(2.5)
        r = httpx.post(f"{service}/admin/rollout/canary", headers=ADMIN,
                       json={"version": version, "weight": weight, "reason": f"test {behaviour}"})
        assert r.status_code == 200, r.text
        time.sleep(2.5)  # the ingress re-reads the rollout every 2 s
        return version

    yield make
    with contextlib.suppress(RolloutRefusedError):  # a test may have rolled back itself
        rollout.rollback(registry, "tests", "cleanup")
    for version in deployed:
        serve.delete(f"model-{version}")


def _post(service: str, client_id: str) -> httpx.Response:
    return httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("q.wav", QUIET)},
                      headers={"X-Client-Id": client_id}, timeout=60)


def test_weighted_split_is_binomial_and_sticky_per_client(service, canary):
    version = canary("echo", weight=10)
    clients = [f"client-{i}" for i in range(600)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        first = list(pool.map(lambda c: _post(service, c), clients))
        again = list(pool.map(lambda c: _post(service, c), clients[:100]))
    assert all(r.status_code == 200 for r in first + again)
    on_canary = [r.headers["x-model-version"] == version for r in first]
    assert all(r.headers["x-route"] == ("canary" if c else "stable") for r, c in zip(first, on_canary))
    share, n, p = sum(on_canary) / len(first), len(first), 0.10
    assert abs(share - p) <= 2.576 * math.sqrt(p * (1 - p) / n), share
    for r1, r2 in zip(first, again):  # a client stays on its version
        assert r1.headers["x-model-version"] == r2.headers["x-model-version"]
    # The version header names who produced the text.
    assert all((r.json()["text"] == "canary says hi") == c for r, c in zip(first, on_canary))


@pytest.mark.parametrize("behaviour", ["raise", "hang"])
def test_a_broken_canary_costs_clients_nothing_and_its_breaker_opens(service, canary, behaviour):
    version = canary(behaviour, weight=100)
    stable = httpx.get(f"{service}/admin/rollout", headers=ADMIN).json()["view"]["aliases"]["stable"]
    for i in range(2):  # a stream falls back the same way: nothing has reached the client yet
        r = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("q.wav", QUIET)},
                       data={"stream": "true"}, headers={"X-Client-Id": f"s{i}"}, timeout=60)
        assert r.status_code == 200 and (r.headers["x-model-version"], r.headers["x-route"]) == (stable, "fallback")
        assert r.text.strip().splitlines()[-1].startswith('data: {"type": "transcript.text.done"')
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: _post(service, f"c{i}"), range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    assert {r.headers["x-model-version"] for r in responses} == {stable}
    assert {r.headers["x-route"] for r in responses} == {"fallback"}
    serving = httpx.get(f"{service}/admin/rollout", headers=ADMIN).json()["serving"]
    assert serving["breakers"][version]["state"] in ("open", "half_open")
    assert serving["fallbacks"] >= 5  # the failures that opened it, each answered by stable
    # With the breaker open, requests skip the canary and are answered at once.
    start = time.monotonic()
    assert _post(service, "after").status_code == 200
    assert time.monotonic() - start < 2.5  # below canary_timeout_s: the hung canary was not asked


def test_a_model_application_that_never_says_its_version_delays_no_routing_change(service, canary, registry,
                                                                                   tmp_path):
    """The ingress asks each new model application which version it serves; one that never
    answers is skipped (serve.control_timeout_s) and not asked again for a while, so a new canary
    still gets its traffic and the mute one gets none."""
    mute = "test-mute-v1"
    publish_dummy(registry, mute, tmp_path)
    serve.run(FakeVersion.bind(mute, "mute"), name=f"model-{mute}", route_prefix=None)
    try:
        time.sleep(3)  # the ingress has met it, and asked
        version = canary("echo", weight=100)  # waits until routable: within 30 s
        deadline, seen = time.monotonic() + 30, None
        while time.monotonic() < deadline and seen != version:
            r = _post(service, "mute-test")
            assert r.status_code == 200, r.text
            seen = r.headers["x-model-version"]
        assert seen == version
        assert mute not in httpx.get(f"{service}/admin/rollout", headers=ADMIN).json()["serving"]["running"]
    finally:
        serve.delete(f"model-{mute}")


def test_a_model_replicas_ray_task_loop_runs_at_the_idle_policy_and_its_serving_threads_do_not(service):
    """The replica puts its own main thread (Ray's task loop, which wakes every 10 ms) under
    SCHED_IDLE when it starts; the threads that serve (its event loop, gRPC's, the engine's) keep
    the normal policy, and it still answers."""
    import psutil

    pid = stable_replica_pid(service)
    policies = {t.id: os.sched_getscheduler(t.id) for t in psutil.Process(pid).threads()}
    assert policies.pop(pid) == os.SCHED_IDLE
    assert len(policies) > 10 and set(policies.values()) == {os.SCHED_OTHER}
    assert _post(service, "after-idle").status_code == 200


def test_killing_the_model_replica_under_steady_traffic_fails_no_request(service):
    pid = stable_replica_pid(service)
    with SteadyLoad(service) as load:
        time.sleep(3)
        answered_before = len(load.results)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # Serve replaces the replica
            with contextlib.suppress(Exception):
                if stable_replica_pid(service) != pid:
                    break
            time.sleep(1)
        time.sleep(3)
    assert answered_before > 0 and len(load.results) > answered_before + 4
    assert load.failures() == []
    assert stable_replica_pid(service) != pid


def test_promote_then_roll_back_under_load_fails_nothing_and_every_version_header_is_true(service, canary):
    version = canary("echo", weight=50)
    with SteadyLoad(service) as load:
        time.sleep(2)
        r = httpx.post(f"{service}/admin/rollout/promote", headers=ADMIN, json={"reason": "test"})
        assert r.status_code == 200, r.text
        time.sleep(4)
        r = httpx.post(f"{service}/admin/rollout/rollback", headers=ADMIN, json={"reason": "test"})
        assert r.status_code == 200, r.text
        time.sleep(4)
    assert load.failures() == []
    versions = {v for _, v, _ in load.results}
    assert version in versions and len(versions) == 2
    for _, v, text in load.results:  # the header names the version that produced the text
        assert (text == "canary says hi") == (v == version)
    after = httpx.get(f"{service}/admin/rollout", headers=ADMIN).json()["view"]["aliases"]
    assert after["stable"] != version and after["canary"] is None


def test_rollout_cli_shows_the_rollout_and_needs_the_admin_token(service, monkeypatch):
    import json

    from typer.testing import CliRunner

    from asrops.cli.main import app

    monkeypatch.setenv("ASROPS_ADMIN_TOKEN", ADMIN_TOKEN)
    result = CliRunner().invoke(app, ["rollout", "status", "--json", "--url", service])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["view"]["aliases"]["stable"].startswith("whisper-tiny.en-")
    monkeypatch.setenv("ASROPS_ADMIN_TOKEN", "wrong")
    result = CliRunner().invoke(app, ["rollout", "promote", "--url", service])
    assert result.exit_code == 1 and "401" in result.output


def test_shadow_copies_are_answered_by_stable_and_their_disagreement_recorded(service, canary, speech_dir):
    version = canary("echo", weight=0)
    r = httpx.post(f"{service}/admin/rollout/traffic", headers=ADMIN, json={"shadow_share": 1.0, "reason": "shadow"})
    assert r.status_code == 200
    time.sleep(2.5)
    jfk = (speech_dir / "faster_whisper/jfk.flac").read_bytes()
    for _ in range(3):
        r = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("jfk.flac", jfk)}, timeout=60)
        assert r.status_code == 200 and r.headers["x-route"] == "shadow"
        assert r.headers["x-model-version"] != version and "country" in r.json()["text"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        serving = httpx.get(f"{service}/admin/rollout", headers=ADMIN).json()["serving"]
        if serving["shadow_compared"] >= 3:
            break
        time.sleep(0.5)
    assert serving["shadow_compared"] >= 3
    assert serving["shadow_mean_wer"] > 90  # "canary says hi" against Kennedy's sentence


def test_the_reconciler_deploys_a_referenced_version_warm_and_removes_it_once_unreferenced(service, registry,
                                                                                          data_dir):
    from asrops.serve.launcher import VersionReconciler

    stable = registry.resolve("stable")
    copy = "whisper-copy-for-test"
    if copy not in {m.id for m in registry.list_versions()}:
        registry.publish(registry.fetch(stable), id=copy, family="whisper", parent=stable, source="test copy")
    settings = Settings(data_dir=data_dir)
    settings.serve.drain_s = 1.0
    reconciler = VersionReconciler(settings, registry)
    rollout.deploy_canary(registry, copy, weight=0, shadow_share=0.0, actor="tests", reason="reconciler test")
    try:
        reconciler.step()  # returns once the new version is deployed and warm
        assert serve.status().applications[f"model-{copy}"].status == "RUNNING"
        wait_routable(service, copy)
    finally:
        rollout.rollback(registry, "tests", "reconciler test done")
    reconciler.step()  # unreferenced from now on
    time.sleep(1.2)
    reconciler.step()  # past the drain: deleted
    deadline = time.monotonic() + 60
    while f"model-{copy}" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(1)
    assert f"model-{copy}" not in serve.status().applications
    assert f"model-{stable}" in serve.status().applications  # the stable is never touched
