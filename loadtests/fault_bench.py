"""Fault injection: client load at 80 % of the measured maximum throughput while one fault at a
time is injected into the running stack, and what came of it.

    python -m loadtests.fault_bench [--phase-s 600] [--work out/fault-bench] [--faults a,b,...]

The stack is the embedded default's with its stores on S3: the registry on one moto server and
the production log (with the feedback store) on another, each a separate process speaking HTTP
on 127.0.0.1, beside Ray Serve, the promotion controller, the drift monitor and Prometheus. Each
phase runs the load for `--phase-s` seconds; its fault is injected after a third of it and
removed after two thirds:

    replica_killed      the stable version's model replica is killed (Serve restarts it)
    canary_raising      a canary (20 %) whose every request raises
    canary_hanging      a canary (20 %) that never answers
    registry_down       the registry's S3 server stops answering (SIGSTOP), then resumes
    log_store_down      the production log's S3 server stops answering, then resumes
    feedback_store_down the same, while every answer is also corrected through POST /v1/feedback
    prometheus_down     Prometheus is stopped during a canary's analysis, then started again
    tampered_artifact   a canary whose weights were changed in the registry after publishing

Prints a table: requests sent, answered 2xx, 4xx, 5xx (503 with Retry-After apart), lost (no
answer); production-log records written + dropped against requests sent; and the decision each
fault led to (the rollout's audit entries and the controller's phase). Needs moto[server] and
Prometheus (Debian's package), like the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import BaseModel

from loadtests.local_s3 import LOCAL_S3_CREDENTIALS, MotoServer

ADMIN_TOKEN = "fault-bench-admin"
FAULTS = ["replica_killed", "canary_raising", "canary_hanging", "registry_down", "log_store_down",
          "feedback_store_down", "prometheus_down", "tampered_artifact"]


class PhaseResult(BaseModel):
    fault: str
    sent: int
    statuses: dict[str, int]
    lost: int
    retry_after_503: int
    log_written: int
    log_dropped: int
    feedback: dict[str, int] = {}
    decision: str


# --- the stack --------------------------------------------------------------------------------
def stack_env(work: Path, registry: MotoServer, log_store: MotoServer) -> dict[str, str]:
    return {
        "ASROPS_DATA_DIR": str(work / "data"),
        "ASROPS_REGISTRY__URI": f"s3://{registry.bucket}/registry",
        "ASROPS_REGISTRY__S3_ENDPOINT_URL": registry.url,
        "ASROPS_MONITORING__PRODUCTION_LOG__URI": f"s3://{log_store.bucket}/prodlog",
        "ASROPS_MONITORING__PRODUCTION_LOG__S3_ENDPOINT_URL": log_store.url,
        "ASROPS_SERVE__ADMIN_TOKENS": json.dumps([ADMIN_TOKEN]),
        "ASROPS_MONITORING__SCRAPE_INTERVAL_S": "2",
        # The analysis's default evidence (20 canary requests a window): at 80 % of this
        # machine's ~2.3 requests/s, a 60-s window holds about 28 at 25 % of traffic.
        "ASROPS_PROMOTION__ANALYSIS__INTERVAL_S": "10",
        "ASROPS_PROMOTION__ANALYSIS__WINDOW_S": "60",
        "ASROPS_PROMOTION__ANALYSIS__STEP_WEIGHTS": "[25, 50]",
        "ASROPS_PROMOTION__ANALYSIS__INIT_TIMEOUT_S": "60",
        "ASROPS_PROMOTION__ANALYSIS__THRESHOLD": "2",
    }


def log_records(metrics_port: int) -> Counter[str]:
    """The ingress's production-log record counts by outcome, from Ray's metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: Counter[str] = Counter()
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "ray_asrops_production_log_records":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels.get("outcome", "")] += int(sample.value)
    return counts


# --- the load ---------------------------------------------------------------------------------
class OpenLoopLoad:
    """Requests at a fixed rate (arrivals do not wait for answers), clips round-robin; keeps
    every outcome. With `correct`, each 200 is also corrected through POST /v1/feedback."""

    def __init__(self, url: str, clips, rate_per_s: float, correct: bool = False):
        self.url, self.clips, self.rate, self.correct = url, clips, rate_per_s, correct
        self.statuses: Counter[str] = Counter()
        self.feedback: Counter[str] = Counter()
        self.retry_after_503 = self.lost = self.sent = 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads: list[threading.Thread] = []

    def _one(self, i: int) -> None:
        clip = self.clips[i % len(self.clips)]
        try:
            with httpx.Client(timeout=300) as http:
                r = http.post(f"{self.url}/v1/audio/transcriptions", files={"file": (f"{clip.name}.wav", clip.wav)})
                feedback = None
                if self.correct and r.status_code == 200:
                    try:
                        feedback = http.post(f"{self.url}/v1/feedback", json={
                            "request_id": r.headers["x-request-id"], "text": "a correction"}).status_code
                    except httpx.HTTPError:
                        feedback = "lost"
            with self._lock:
                self.statuses[str(r.status_code)] += 1
                self.retry_after_503 += r.status_code == 503 and "retry-after" in r.headers
                if feedback is not None:
                    self.feedback[str(feedback)] += 1
        except httpx.HTTPError:
            with self._lock:
                self.lost += 1

    def _arrivals(self) -> None:
        start, i = time.monotonic(), 0
        while not self._stop.is_set():
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
                continue
            t = threading.Thread(target=self._one, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
            i += 1
        with self._lock:
            self.sent = i

    def __enter__(self) -> OpenLoopLoad:
        self._arrival_thread = threading.Thread(target=self._arrivals, daemon=True)
        self._arrival_thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._arrival_thread.join()
        for t in self._threads:
            t.join(timeout=330)


def max_throughput(url: str, clips, seconds: float, concurrency: int = 4) -> float:
    """Requests per second a closed loop of `concurrency` clients gets answered (200)."""
    done, stop = Counter(), threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=300) as http:
            i = k
            while not stop.is_set():
                clip = clips[i % len(clips)]
                r = http.post(f"{url}/v1/audio/transcriptions", files={"file": (f"{clip.name}.wav", clip.wav)})
                done[str(r.status_code)] += 1
                i += concurrency

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return done["200"] / (time.monotonic() - started)


# --- faults -----------------------------------------------------------------------------------
class Faults:
    """Each fault as inject() / restore() over the running stack."""

    def __init__(self, settings, registry, stores: dict[str, MotoServer], stack, work: Path,
                 say: Callable[[str], None]):
        self.settings, self.registry, self.stores, self.stack = settings, registry, stores, stack
        self.work, self.say = work, say
        self.versions: list[str] = []

    def _fake_canary(self, behaviour: str) -> str:
        from ray import serve

        from asrops.promotion import rollout
        from tests.fakes import FakeVersion, publish_dummy

        version = f"fault-{behaviour}-{len(self.versions)}"
        (self.work / "fakes").mkdir(parents=True, exist_ok=True)
        publish_dummy(self.registry, version, self.work / "fakes")
        serve.run(FakeVersion.bind(version, behaviour), name=f"model-{version}", route_prefix=None)
        time.sleep(3)  # the ingress refreshes what is running every second
        rollout.deploy_canary(self.registry, version, weight=20, shadow_share=0.0, actor="fault-bench",
                              reason=f"fault injection: a canary that {behaviour}s")
        self.versions.append(version)
        return version

    def _end_canary(self) -> None:
        from asrops.errors import RolloutRefusedError
        from asrops.promotion import rollout

        try:
            rollout.rollback(self.registry, "fault-bench", "end of the fault", expected_canary=self.versions[-1])
        except RolloutRefusedError:
            pass  # the controller already did

    def inject(self, fault: str) -> None:
        if fault == "replica_killed":
            import ray
            from ray.util.state import list_actors

            stable = self.registry.resolve("stable")
            for actor in list_actors(filters=[("state", "=", "ALIVE")]):
                if (actor.class_name or "").startswith(f"ServeReplica:model-{stable}"):
                    ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=False)
                    self.say(f"killed {actor.class_name}")
        elif fault in ("canary_raising", "canary_hanging"):
            self._fake_canary("raise" if fault == "canary_raising" else "hang")
        elif fault == "registry_down":
            self.stores["registry"].pause()
        elif fault in ("log_store_down", "feedback_store_down"):
            self.stores["log"].pause()
        elif fault == "prometheus_down":
            self.stack.prometheus.stop()
        elif fault == "tampered_artifact":
            self._tampered_canary()

    def restore(self, fault: str) -> None:
        if fault in ("canary_raising", "canary_hanging", "tampered_artifact"):
            self._end_canary()
        elif fault == "registry_down":
            self.stores["registry"].resume()
        elif fault in ("log_store_down", "feedback_store_down"):
            self.stores["log"].resume()
        elif fault == "prometheus_down":
            self.stack.prometheus._proc = None
            self.stack.prometheus.start()

    def before(self, fault: str) -> None:
        """What a phase needs before its fault: prometheus_down needs a canary under analysis."""
        if fault == "prometheus_down":
            self._fake_canary("echo")

    def after(self, fault: str) -> None:
        if fault == "prometheus_down":
            self._end_canary()

    def _tampered_canary(self) -> None:
        """A copy of the stable published as a new version, one of its files then changed in the
        registry's store (as an attacker with write access, or a corrupted upload, would)."""
        from asrops.models.importer import publish_checkpoint
        from asrops.promotion import rollout

        stable = self.registry.resolve("stable")
        src, out = self.registry.fetch(stable), self.work / "tampered"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("onnx", "reports"))
        manifest = publish_checkpoint(self.registry, out, family="whisper", parent=stable, progress=self.say,
                                      source="loadtests/fault_bench.py: to be tampered with")
        key = next(k for k in self.registry.store.list_prefix(f"versions/{manifest.id}/")
                   if k.endswith((".safetensors", ".onnx", ".bin")))
        data = bytearray(self.registry.store.read_bytes(key)[0])
        data[len(data) // 2] ^= 0xFF
        self.registry.store.write_bytes(key, bytes(data))
        self.say(f"tampered with {key}")
        self.versions.append(manifest.id)
        rollout.deploy_canary(self.registry, manifest.id, weight=20, shadow_share=0.0, actor="fault-bench",
                              reason="fault injection: a tampered artifact")


def settled_log_records(settings, quiet_s: float = 15.0, timeout_s: float = 300.0) -> Counter[str]:
    """The record counts once they have not changed for `quiet_s`: the production log has
    written what its buffer held (every `flush_interval_s`) and Ray has exported the counters
    (its metrics agent reports every few seconds), so no phase counts another's records."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while True:
        now = log_records(settings.monitoring.ray_metrics_port)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s or time.monotonic() > deadline:
            return now
        time.sleep(1)


def wait_for_drift_reference(settings, say: Callable[[str], None], timeout_s: float = 900) -> None:
    """Until the drift monitor has made its reference (on a fresh data directory it transcribes
    100 synthetic clips through the service): those requests would count against the phases."""
    from asrops.monitoring.reference import load_reference
    from asrops.prodlog import store_for

    deadline, noted = time.monotonic() + timeout_s, 0.0
    while load_reference(store_for(settings)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the drift monitor made no reference")
        if time.monotonic() - noted > 30:
            say("waiting for the drift monitor's reference")
            noted = time.monotonic()
        time.sleep(2)
    time.sleep(5)  # its last requests' records


def decision_since(registry, since: datetime) -> str:
    from asrops.promotion import rollout

    entries = [e for e in rollout.read_audit(registry, 200) if e.at >= since and e.actor != "fault-bench"]
    said = [f"{e.action} by {e.actor} ({e.reason[:60]})" for e in entries]
    analysis = rollout.read_analysis(registry)
    if analysis is not None and analysis.history:
        said += [f"controller: {d.action} ({d.reason[:60]})" for d in analysis.history if d.at >= since][-3:]
    return "; ".join(said) or "none (nothing to decide)"


def run_phase(fault: str, url: str, clips, rate: float, phase_s: float, faults: Faults, settings,
              say: Callable[[str], None]) -> PhaseResult:
    since = datetime.now(UTC)
    faults.before(fault)
    before = settled_log_records(settings)
    with OpenLoopLoad(url, clips, rate, correct=fault == "feedback_store_down") as load:
        time.sleep(phase_s / 3)
        say(f"{fault}: injecting")
        faults.inject(fault)
        time.sleep(phase_s / 3)
        say(f"{fault}: restoring")
        faults.restore(fault)
        time.sleep(phase_s / 3)
    faults.after(fault)
    after = settled_log_records(settings) - before  # what was buffered while the store was down, too
    return PhaseResult(fault=fault, sent=load.sent, statuses=dict(load.statuses), lost=load.lost,
                       retry_after_503=load.retry_after_503, log_written=after["written"],
                       log_dropped=after["dropped"], feedback=dict(load.feedback),
                       decision=decision_since(faults.registry, since))


def table(rate: float, phase_s: float, results: list[PhaseResult]) -> str:
    lines = [f"load: {rate:.2f} requests/s (80 % of the measured maximum), {phase_s:.0f} s per fault, "
             "injected for its middle third", "",
             "| fault | sent | 2xx | 4xx | 5xx (503 + Retry-After) | lost | log written + dropped = sent | "
             "feedback | decision |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        by = Counter()
        for status, n in r.statuses.items():
            by[status[0] + "xx"] += n
        logged = r.log_written + r.log_dropped
        lines.append(f"| {r.fault} | {r.sent} | {by['2xx']} | {by['4xx']} | {by['5xx']} ({r.retry_after_503}) | "
                     f"{r.lost} | {r.log_written} + {r.log_dropped} = {logged} {'✔' if logged == r.sent else '✘'} | "
                     f"{r.feedback or '—'} | {r.decision} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fault_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=600.0)
    parser.add_argument("--work", type=Path, default=Path("out/fault-bench"))
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--clips", type=int, default=20)
    args = parser.parse_args(argv)
    faults_wanted = [f for f in args.faults.split(",") if f]
    if unknown := set(faults_wanted) - set(FAULTS):
        parser.error(f"unknown faults: {sorted(unknown)}")

    def say(message: str) -> None:
        print(f"{datetime.now():%H:%M:%S} {message}", file=sys.stderr, flush=True)

    work = args.work.resolve()
    shutil.rmtree(work / "data", ignore_errors=True)
    os.environ.update(LOCAL_S3_CREDENTIALS)
    stores = {"registry": MotoServer("asrops-registry"), "log": MotoServer("asrops-log")}
    os.environ.update(stack_env(work, stores["registry"], stores["log"]))
    from asrops.cli.stack import start_monitoring
    from asrops.registry import ModelRegistry
    from asrops.serve.launcher import VersionReconciler, run_local
    from asrops.settings import Settings
    from loadtests.service_bench import load_clips

    settings = Settings()
    stack = None
    try:
        say("starting the service on S3 stores (first run imports the embedded model into the registry)")
        url = run_local(settings, say)
        stack = start_monitoring(settings, say)
        registry = ModelRegistry.from_settings(settings)
        stop = VersionReconciler(settings, registry).in_background(say=say)  # the tampered canary fails there
        wait_for_drift_reference(settings, say)  # its bootstrap sends requests of its own
        clips = load_clips(args.clips)
        say("measuring the maximum throughput (closed loop, 4 clients, 60 s)")
        maximum = max_throughput(url, clips, 60)
        rate = 0.8 * maximum
        say(f"maximum {maximum:.2f} requests/s (closed loop, 4 clients)")
        faults = Faults(settings, registry, stores, stack, work, say)
        results = []
        for fault in faults_wanted:
            say(f"phase {fault}: {args.phase_s:.0f} s at {rate:.2f} requests/s")
            results.append(run_phase(fault, url, clips, rate, args.phase_s, faults, settings, say))
            say(results[-1].model_dump_json())
        report = table(rate, args.phase_s, results)
        print(report)
        (work / "report.md").write_text(report + "\n")
        stop.set()
        return 0
    finally:
        if stack is not None:
            stack.stop()
        for store in stores.values():
            store.stop()
        import ray

        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
