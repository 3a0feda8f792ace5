"""Monitoring on the running service (real Ray Serve, real model, synthetic speech): the
production log the ingress writes, drift verdicts from it, and a log store that fails.

Traffic goes through the real HTTP API with `monitoring.simulate`; the drift monitor reads the
production log the ingress wrote. Windows are cut from the traffic's own time span, so 20
windows need no 20 x 5 minutes of waiting.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client import start_http_server
from ray import serve

from asrops.errors import RolloutRefusedError
from asrops.monitoring.monitor import DriftMonitor, MonitorMetrics
from asrops.monitoring.prometheus import PrometheusClient, PrometheusServer
from asrops.monitoring.promql import expressions_to_check
from asrops.monitoring.reference import pin_window
from asrops.monitoring.simulate import MixPart, simulate
from asrops.prodlog import ProductionLogReader, store_for
from asrops.promotion import rollout
from asrops.promotion.metrics import ControllerMetrics
from asrops.registry import ModelRegistry
from asrops.synth import SynthSpec, generate
from tests.conftest import ADMIN_HEADERS as ADMIN
from tests.conftest import prometheus_settings
from tests.fakes import FakeVersion, publish_dummy, wait_routable

pytestmark = pytest.mark.slow

WINDOW_REQUESTS = 15  # requests per judged window (min_samples below)
DOMAINS = ["general", "commands"]


@pytest.fixture(scope="module")
def clean_clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return generate(SynthSpec(n=60, voices=["en-us", "kal", "slt"], domains=DOMAINS, seed=11), out)


@pytest.fixture(scope="module")
def drifted_clips(tmp_path_factory):
    """The same sentences' domains, spoken in Scottish and Caribbean English over white noise at 10 dB."""
    out = tmp_path_factory.mktemp("drifted")
    return generate(SynthSpec(n=40, voices=["en-gb-scotland", "en-029"], rate=(185, 205), snr_db=10,
                              domains=DOMAINS, seed=12), out)


@contextlib.contextmanager
def _served(metrics, port: int):
    """`metrics` (a prometheus-client registry holder) served on `port` for the `with` block."""
    server, _ = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield metrics
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def monitor_metrics(service_settings):
    """The drift monitor's metrics, served where the monitor serves them (scraped by Prometheus)."""
    with _served(MonitorMetrics(), service_settings.monitoring.monitor_port) as metrics:
        yield metrics


@pytest.fixture(scope="module")
def controller_metrics(service_settings):
    """The promotion controller's metrics, where the controller serves them (no rollout runs here)."""
    with _served(ControllerMetrics(), service_settings.promotion.metrics_port) as metrics:
        yield metrics


@pytest.fixture(scope="module")
def prometheus(service, service_settings, monitor_metrics, controller_metrics, tmp_path_factory):
    """A real Prometheus (Debian's) scraping the local Ray node, the monitor and the controller."""
    settings = prometheus_settings(service_settings)
    with PrometheusServer(settings, tmp_path_factory.mktemp("prometheus")) as server:
        yield PrometheusClient(server.url)


def _send(service, manifest, count, rate=40.0, seed=None):
    result = simulate(service, [MixPart(manifest=manifest, weight=1)], rate_per_s=rate, count=count,
                      concurrency=8, seed=count if seed is None else seed)
    assert result.statuses == {"200": count}, result.statuses
    time.sleep(1.5)  # the ingress flushes its production log every 0.5 s here


def _windows(service, manifest, windows: int) -> list[tuple[datetime, datetime]]:
    """WINDOW_REQUESTS requests per window, sent window by window: each window's span holds
    exactly its own requests, however the service's speed varies (windows of equal length over
    one stretch of traffic left some thin when the machine was busy)."""
    spans = []
    for i in range(windows):
        begin = datetime.now(UTC)
        _send(service, manifest, WINDOW_REQUESTS, seed=100 + i)
        spans.append((begin, datetime.now(UTC)))
    return spans


def _judge(monitor: DriftMonitor, settings, spans: list[tuple[datetime, datetime]]):
    outcomes = []
    for begin, end in spans:
        settings.drift.window_s = (end - begin).total_seconds()
        monitor.settings = settings
        outcomes.append(monitor.run_window(end))
    return outcomes


STATIONARY_WINDOWS = 10
"""Windows of stationary traffic through the real service. The false-alarm rate over more
windows is test_drift.py's question (same statistics, no service, 20 windows in seconds)."""


def test_stationary_traffic_gives_no_verdict_in_10_windows_and_a_shift_one_within_3(
        service, service_settings, clean_clips, drifted_clips, monitor_metrics):
    settings = service_settings.monitoring.model_copy(deep=True)
    store = store_for(service_settings)

    t0 = datetime.now(UTC)
    _send(service, clean_clips, 60)
    reference = pin_window(store, t0, datetime.now(UTC))
    assert len(reference) == 60 and reference["snr_db"].notna().all()

    stationary_spans = _windows(service, clean_clips, STATIONARY_WINDOWS)
    drifted_spans = _windows(service, drifted_clips, 3)
    log = ProductionLogReader(store).read(stationary_spans[0][0], drifted_spans[-1][1])
    assert len(log) == (STATIONARY_WINDOWS + 3) * WINDOW_REQUESTS  # one record per request, none lost

    settings.drift.min_samples = WINDOW_REQUESTS
    monitor = DriftMonitor(store, settings, monitor_metrics, reference=reference)
    stationary = _judge(monitor, settings, stationary_spans)
    assert [o.samples for o in stationary] == [WINDOW_REQUESTS] * STATIONARY_WINDOWS  # every window judged
    assert [o.verdict.state for o in stationary].count("drift") == 0, [
        (o.samples, o.result.drift_share if o.result else None) for o in stationary]

    shifted = _judge(monitor, settings, drifted_spans)
    assert "drift" in [o.verdict.state for o in shifted], [  # (each window's drift share and drifted columns)
        (o.samples, o.result.drift_share if o.result else None,
         [c.column for c in o.result.columns if c.drifted] if o.result else None, o.verdict) for o in shifted]
    drifted = next(o for o in shifted if o.verdict.state == "drift")
    by_column = {c.column: c for c in drifted.result.columns}
    assert by_column["snr_db"].drifted  # the noise is seen where it is
    assert drifted.report_html and drifted.report_json


@contextlib.contextmanager
def unwritable_log_store(service_settings):
    """The production log's directory replaced by a plain file: every write into it fails."""
    root = store_for(service_settings).root
    moved = root.with_name(root.name + "-moved")
    root.rename(moved)
    root.write_text("not a directory: every write into the log store fails")
    try:
        yield
    finally:
        root.unlink()
        moved.rename(root)


def _wait_for(query, predicate, timeout_s: float = 90.0, step_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = query()
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(step_s)


def test_an_unwritable_log_store_does_not_stop_transcription_and_shows_in_a_metric(
        service, service_settings, clean_clips, prometheus):
    failures = "sum(ray_asrops_production_log_write_failures_total) or vector(0)"
    before = prometheus.query_value(failures)
    start = datetime.now(UTC)
    with unwritable_log_store(service_settings):
        result = simulate(service, [MixPart(manifest=clean_clips, weight=1)], rate_per_s=20, count=20)
        assert result.statuses == {"200": 20}  # transcription goes on
        assert _wait_for(lambda: prometheus.query_value(failures), lambda v: v > before) > before
    # Once the store works again, the records kept in memory are written.
    reader = ProductionLogReader(store_for(service_settings))
    assert len(_wait_for(lambda: reader.read(start, datetime.now(UTC)), lambda f: len(f) >= 20, 30)) == 20


class BackgroundLoop:
    """Runs `_run` in a thread for the length of a `with` block; `_run` checks `_stop`."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class BackgroundTraffic(BackgroundLoop):
    """Real speech at a steady rate until stopped, so that rates and quantiles have data."""

    def __init__(self, service, manifest, rate_per_s: float = 3.0):
        super().__init__()
        self.service, self.manifest, self.rate = service, manifest, rate_per_s
        self.statuses: dict[str, int] = {}

    def _run(self):
        seed = 0
        while not self._stop.is_set():
            seed += 1
            r = simulate(self.service, [MixPart(manifest=self.manifest, weight=1)], self.rate, count=6, seed=seed)
            for k, v in r.statuses.items():
                self.statuses[k] = self.statuses.get(k, 0) + v


class Corrections(BackgroundLoop):
    """A client correcting one of its transcriptions every couple of seconds (live WER's rates)."""

    def __init__(self, service, manifest):
        super().__init__()
        self.service, self.clip = service, next((manifest.parent / "audio").glob("*.wav")).read_bytes()
        self.refused: list[str] = []

    def _run(self):
        while not self._stop.wait(2.0):
            answered = httpx.post(f"{self.service}/v1/audio/transcriptions", files={"file": ("c.wav", self.clip)},
                                  timeout=60)
            body = {"request_id": answered.headers["x-request-id"], "text": "something else entirely was said"}
            for _ in range(10):  # the test breaks the log store for a moment: retry as Retry-After says
                r = httpx.post(f"{self.service}/v1/feedback", json=body, timeout=60)
                if r.status_code != 503:
                    break
                time.sleep(float(r.headers["retry-after"]))
            if r.status_code != 200 or not r.json()["word_errors"]:
                self.refused.append(r.text)


def test_every_dashboard_and_alert_expression_finds_data_in_a_real_prometheus(
        service, service_settings, clean_clips, prometheus, monitor_metrics, tmp_path):
    registry = ModelRegistry.from_settings(service_settings)
    store = store_for(service_settings)
    versions = {"raise": "test-prom-raise-v1", "echo": "test-prom-echo-v1"}
    for behaviour, version in versions.items():
        publish_dummy(registry, version, tmp_path)
        serve.run(FakeVersion.bind(version, behaviour), name=f"model-{version}", route_prefix=None)
    wait_routable(service, versions["echo"])
    try:
        with BackgroundTraffic(service, clean_clips) as traffic, Corrections(service, clean_clips) as corrections:
            # A canary that fails every request: fallbacks, and its breaker opens.
            r = httpx.post(f"{service}/admin/rollout/canary", headers=ADMIN,
                           json={"version": versions["raise"], "weight": 100, "reason": "prometheus test"})
            assert r.status_code == 200, r.text
            time.sleep(8)
            # Then a canary in shadow: every stable request is copied to it and compared.
            rollout.rollback(registry, "tests", "next canary")
            r = httpx.post(f"{service}/admin/rollout/canary", headers=ADMIN, json={
                "version": versions["echo"], "weight": 0, "shadow_share": 1.0, "reason": "prometheus test"})
            assert r.status_code == 200, r.text
            # Bad uploads (decode errors), a log store that fails for a moment, a drift window.
            for _ in range(3):
                assert httpx.post(f"{service}/v1/audio/transcriptions",
                                  files={"file": ("x.wav", b"RIFF....WAVEfmt garbage")}).status_code == 415
            with unwritable_log_store(service_settings):
                time.sleep(3)
            time.sleep(5)
            settings = service_settings.monitoring.model_copy(deep=True)
            settings.drift.min_samples = 5
            settings.drift.window_s = 30
            reference = pin_window(store, datetime.now(UTC) - timedelta(seconds=30), datetime.now(UTC))
            DriftMonitor(store, settings, monitor_metrics, reference=reference).run_window()

            checks = expressions_to_check()
            missing = _wait_for(lambda: [c for c in checks if not _has_data(prometheus, c.query)], lambda m: not m)
        assert set(traffic.statuses) == {"200"}, traffic.statuses  # nothing of the above reached a client
        assert not corrections.refused, corrections.refused
    finally:
        with contextlib.suppress(RolloutRefusedError):
            rollout.rollback(registry, "tests", "cleanup")
        for version in versions.values():
            serve.delete(f"model-{version}")
    assert not missing, "no data for:\n" + "\n".join(f"{c.source}: {c.query}" for c in missing) + (
        "\nscrape targets:\n" + "\n".join(f"{t.job} {t.url} {t.health} {t.last_error}" for t in prometheus.targets()))


def _has_data(prometheus: PrometheusClient, query: str) -> bool:
    return any(not math.isnan(s.value) for s in prometheus.query(query))


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket these processes listen on."""
    import psutil

    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found += [(c.laddr.ip, c.laddr.port, proc.name()) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_every_port_of_the_local_stack_listens_on_loopback_only(service, prometheus, monitor_metrics,
                                                                 controller_metrics):
    """Ray (GCS, raylet, object manager, workers, agents, dashboard, Serve's proxy), Prometheus,
    the monitor's and the controller's metrics: whoever reaches Ray's ports can run code."""
    import ipaddress
    import os

    import psutil

    assert httpx.get(f"{service}/readyz").status_code == 200
    ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    sockets = _listening(ours)
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet", "prometheus"} <= names, names  # the check sees the whole stack
    exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback
               and not (s[0].startswith("::ffff:") and ipaddress.ip_address(s[0][7:]).is_loopback)]
    assert not exposed, f"listening beyond loopback: {sorted(exposed)}"
