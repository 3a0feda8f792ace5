"""Routing rules: weighted sticky canary split, explicit versions, shadow share, fallback chains."""

import math

import pytest

from asrops.errors import VersionNotFoundError
from asrops.registry import Aliases, RolloutState
from asrops.serve.routing import Route, bucket, plan_route

ALIASES = Aliases(stable="v1", canary="v2", fallback="v0")
RUNNING = {"v0", "v1", "v2"}


def rollout(weight: int = 0, shadow: float = 0.0) -> RolloutState:
    return RolloutState(canary_version="v2", canary_weight=weight, shadow_share=shadow)


def test_canary_share_at_weight_10_is_within_the_99_percent_binomial_interval():
    n, p = 2000, 0.10
    routes = [plan_route("stable", ALIASES, rollout(10), f"client-{i}", f"req-{i}", RUNNING).route for i in range(n)]
    share = routes.count(Route.CANARY) / n
    half_width = 2.576 * math.sqrt(p * (1 - p) / n)
    assert abs(share - p) <= half_width, share


def test_a_client_stays_on_one_version_and_raising_the_weight_never_moves_it_back():
    clients = [f"key-{i}" for i in range(500)]
    on_canary = {}
    for weight in (5, 10, 25, 50, 100):
        for client in clients:
            versions = {plan_route("stable", ALIASES, rollout(weight), client, f"r{j}", RUNNING).version
                        for j in range(3)}
            assert len(versions) == 1  # sticky within a step, whatever the request id
            now = versions.pop() == "v2"
            assert not (on_canary.get(client) and not now)  # once on the canary, stays there
            on_canary[client] = now
    assert all(on_canary.values())  # weight 100: everyone


def test_a_new_canary_reshuffles_who_goes_first():
    clients = [f"key-{i}" for i in range(1000)]
    first = {c for c in clients if bucket(c, "v2") < 10}
    second = {c for c in clients if bucket(c, "v3") < 10}
    assert first != second and 0 < len(first & second) < len(first)


def test_canary_requests_fall_back_to_stable_then_to_the_fallback_alias():
    client = next(f"c{i}" for i in range(1000) if bucket(f"c{i}", "v2") < 50)
    plan = plan_route("stable", ALIASES, rollout(50), client, "r", RUNNING)
    assert (plan.version, plan.route) == ("v2", Route.CANARY)
    assert plan.fallbacks == [("v1", Route.FALLBACK), ("v0", Route.FALLBACK)]


def test_stable_requests_fall_back_to_the_fallback_alias_only_when_it_runs():
    plan = plan_route("stable", ALIASES, rollout(0), "c", "r", RUNNING)
    assert (plan.version, plan.route, plan.fallbacks) == ("v1", Route.STABLE, [("v0", Route.FALLBACK)])
    plan = plan_route("stable", ALIASES, rollout(0), "c", "r", {"v1", "v2"})
    assert plan.fallbacks == []


def test_an_explicit_version_or_alias_wins_over_the_split():
    for weight in (0, 100):
        assert plan_route("v1", ALIASES, rollout(weight), "c", "r", RUNNING).route == Route.EXPLICIT
        plan = plan_route("canary", ALIASES, rollout(weight), "c", "r", RUNNING)
        assert (plan.version, plan.route) == ("v2", Route.EXPLICIT)


def test_shadow_copies_a_share_of_stable_traffic_to_the_canary_and_stable_answers():
    plans = [plan_route("stable", ALIASES, rollout(0, shadow=0.3), "same-client", f"req-{i}", RUNNING)
             for i in range(2000)]
    shadowed = [p for p in plans if p.route == Route.SHADOW]
    assert all(p.version == "v1" and p.shadow == "v2" for p in shadowed)
    assert abs(len(shadowed) / 2000 - 0.3) < 0.05  # drawn per request, not per client


def test_weight_zero_and_no_shadow_sends_nothing_to_the_canary():
    plans = [plan_route("stable", ALIASES, rollout(0), f"c{i}", f"r{i}", RUNNING) for i in range(500)]
    assert {p.version for p in plans} == {"v1"} and all(p.shadow is None for p in plans)


def test_a_canary_that_is_not_running_yet_gets_no_traffic():
    plan = plan_route("stable", ALIASES, rollout(100), "c", "r", {"v0", "v1"})
    assert (plan.version, plan.route) == ("v1", Route.STABLE)


def test_unknown_names_are_not_found():
    with pytest.raises(VersionNotFoundError):
        plan_route("v9", ALIASES, rollout(), "c", "r", RUNNING)
    with pytest.raises(VersionNotFoundError):
        plan_route("canary", Aliases(stable="v1"), RolloutState(), "c", "r", {"v1"})
    with pytest.raises(VersionNotFoundError) as long_name:  # a client's 100-KB name is not echoed whole
        plan_route("v" * 100_000, ALIASES, rollout(), "c", "r", RUNNING)
    assert "'vvvv" in str(long_name.value) and len(str(long_name.value)) < 200


def test_without_a_running_stable_the_fallback_answers():
    plan = plan_route("stable", ALIASES, rollout(), "c", "r", {"v0"})
    assert (plan.version, plan.route) == ("v0", Route.FALLBACK)
    with pytest.raises(VersionNotFoundError):
        plan_route("stable", ALIASES, rollout(), "c", "r", set())


def test_a_canary_gets_longer_for_longer_audio_before_it_counts_as_failing():
    """30 s for any audio made long, legitimate audio on a healthy canary a canary failure."""
    from types import SimpleNamespace

    import numpy as np

    from asrops.engines.types import DecodeOptions
    from asrops.serve.ingress import ServeTranscriber
    from asrops.serve.model_server import ModelRequest
    from asrops.settings import Settings

    settings = Settings(data_dir="/nonexistent")
    me = SimpleNamespace(settings=settings)
    short = ModelRequest.of(np.zeros(16_000, np.float32), DecodeOptions())
    long = ModelRequest.of(np.zeros(600 * 16_000, np.float32), DecodeOptions())
    assert ServeTranscriber._timeout(me, short) == pytest.approx(30.5)
    assert ServeTranscriber._timeout(me, long) == pytest.approx(330.0)


def test_a_model_request_carries_16_bit_pcm_only():
    import numpy as np

    from asrops.engines.types import DecodeOptions
    from asrops.serve.model_server import ModelRequest

    samples = np.array([0.0, 0.5, -0.25], np.float32)
    request = ModelRequest.of(samples, DecodeOptions())
    assert request.pcm16.dtype == np.int16 and request.pcm16.nbytes == samples.nbytes // 2
    np.testing.assert_array_equal(request.audio, samples)
    with pytest.raises(ValueError, match="int16"):
        ModelRequest(pcm16=samples, options=DecodeOptions())


class _Rollouts:
    """A registry's aliases and rollout, as the ingress and the reconciler read them."""

    def __init__(self, aliases: Aliases, rollout: RolloutState = RolloutState()):
        self.aliases, self.rollout = aliases, rollout

    def read_aliases(self):
        from types import SimpleNamespace

        return SimpleNamespace(value=self.aliases, token=None)

    def read_rollout(self):
        from types import SimpleNamespace

        return SimpleNamespace(value=self.rollout, token=None)


def _serve_apps(monkeypatch, module, apps: dict[str, float]) -> list[int]:
    """Serve's status as the running `apps` (name → deployed at); returns the list of its reads."""
    from types import SimpleNamespace

    reads: list[int] = []

    def status():
        reads.append(1)
        return SimpleNamespace(applications={n: SimpleNamespace(status="RUNNING", last_deployed_time_s=t)
                                             for n, t in apps.items()})

    monkeypatch.setattr(module.serve, "status", status)
    return reads


def test_the_reconciler_reads_serves_status_only_while_something_may_change(monkeypatch):
    import time

    from asrops.serve import launcher
    from asrops.settings import Settings

    apps = {"model-v1": 1.0}
    reads = _serve_apps(monkeypatch, launcher, apps)
    monkeypatch.setattr(launcher, "deploy_version", lambda settings, version: apps.update({f"model-{version}": 2.0}))
    registry, settings = _Rollouts(Aliases(stable="v1")), Settings(data_dir="/nonexistent")
    settings.serve.status_resync_s = 0.5
    reconciler = launcher.VersionReconciler(settings, registry)
    reconciler.step(), reconciler.step()
    assert len(reads) == 1  # the stable runs and nothing else: settled
    registry.rollout = RolloutState(canary_version="v2", canary_weight=10)
    reconciler.step()
    assert len(reads) == 2 and "model-v2" in apps  # a new canary: read, and deployed
    reconciler.step(), reconciler.step()
    assert len(reads) == 3  # once more after a deploy, then settled again
    time.sleep(0.6)
    reconciler.step()
    assert len(reads) == 4  # past serve.status_resync_s


def test_the_ingress_reads_serves_status_only_while_routing_may_change(monkeypatch):
    import asyncio

    from asrops.serve import ingress
    from asrops.settings import Settings

    apps = {"model-v1": 1.0}
    reads = _serve_apps(monkeypatch, ingress, apps)
    registry = _Rollouts(Aliases(stable="v1"))
    transcriber = ingress.ServeTranscriber(registry, Settings(data_dir="/nonexistent"))

    async def version_of(name: str) -> str:
        return name.removeprefix("model-")

    monkeypatch.setattr(transcriber, "_version_of", version_of)

    async def refreshes(n: int) -> None:
        for _ in range(n):
            await transcriber.refresh()

    asyncio.run(refreshes(3))
    assert len(reads) == 1 and transcriber.running == {"v1"}
    registry.rollout = RolloutState(canary_version="v2", canary_weight=10)  # not deployed yet
    asyncio.run(refreshes(2))
    assert len(reads) == 3 and transcriber.running == {"v1"}  # read on every refresh until it runs
    apps["model-v2"] = 2.0
    asyncio.run(refreshes(3))
    assert len(reads) == 4 and transcriber.running == {"v1", "v2"}
    registry.rollout = RolloutState()  # rolled back: v2 routable until it is removed
    asyncio.run(refreshes(2))
    assert len(reads) == 6 and transcriber.running == {"v1", "v2"}
    del apps["model-v2"]
    asyncio.run(refreshes(3))
    assert len(reads) == 7 and transcriber.running == {"v1"}


def test_the_ingress_stops_refreshing_before_serve_shuts_its_threads(monkeypatch, caplog):
    """On a graceful stop Serve runs the replica's `__del__`, then shuts the thread pool that
    `asyncio.to_thread` uses. A routing refresh after that failed, and every stop of the service
    logged the registry as unreachable, with a traceback, sending an SRE after a fault that was
    not there."""
    import asyncio
    import concurrent.futures
    import logging

    from asrops.serve import ingress
    from asrops.settings import Settings

    _serve_apps(monkeypatch, ingress, {"model-v1": 1.0})
    settings = Settings(data_dir="/nonexistent")
    settings.serve.refresh_s = 0.02
    written = ingress.Ingress.func_or_class.__bases__[0]  # the class as written, under Serve's ASGI wrapper
    replica = object.__new__(written)  # with the attributes __init__ sets that a refresh uses
    replica.settings, replica.production_log = settings, None
    replica.transcriber = ingress.ServeTranscriber(_Rollouts(Aliases(stable="v1")), settings)

    async def version_of(name: str) -> str:
        return name.removeprefix("model-")

    monkeypatch.setattr(replica.transcriber, "_version_of", version_of)

    async def serve_and_stop() -> bool:
        threads = concurrent.futures.ThreadPoolExecutor(2)  # as Serve's replica sets it
        asyncio.get_running_loop().set_default_executor(threads)
        replica._refresher = asyncio.get_running_loop().create_task(replica._refresh_forever())
        for _ in range(500):  # refreshing while it serves (a loaded machine may take a while)
            if replica.transcriber.running == {"v1"}:
                break
            await asyncio.sleep(settings.serve.refresh_s)
        assert replica.transcriber.running == {"v1"}
        replica.__del__()  # Serve's graceful shutdown, in its order
        threads.shutdown(wait=False)
        await asyncio.sleep(10 * settings.serve.refresh_s)
        return replica._refresher.done()

    with caplog.at_level(logging.WARNING, logger=ingress.log.name):
        stopped = asyncio.run(serve_and_stop())
    assert stopped
    assert not caplog.records, [r.getMessage() for r in caplog.records]
