"""The adapter for Prometheus: writes the config of a local server, runs Debian's `prometheus`
binary, and queries any server over its HTTP API. Everything else in asrops talks to
Prometheus through this module, and gets our own types back (`Sample`, floats, `None` for no
data), so a test can put a real server behind it."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx
import yaml
from pydantic import BaseModel

from asrops.errors import AsropsError
from asrops.settings import Settings

ALERT_RULES_FILE = Path(__file__).resolve().parent / "prometheus" / "alerts.yml"
"""Recording and alerting rules every Prometheus of ours loads."""
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
"""Where Ray lists its nodes' metrics endpoints (under Ray's default temp dir)."""
MONITOR_JOB = "asrops-monitor"
CONTROLLER_JOB = "asrops-controller"
RAY_JOB = "ray"


class PrometheusError(AsropsError):
    """Prometheus is unreachable, did not start, or refused a query."""


class ScrapeTarget(BaseModel):
    """One target Prometheus scrapes, as its last scrape left it."""

    job: str
    url: str
    health: str
    """"up", "down" or "unknown" (not scraped yet)."""
    last_error: str = ""


class Sample(BaseModel):
    """One series of an instant query: its labels and its value at evaluation time."""

    labels: dict[str, str]
    value: float
    """May be NaN (e.g. 0/0 over a window with no requests) or +-Inf."""


def _duration(seconds: float) -> str:
    """A Prometheus duration; below a second Prometheus would scrape too often to be useful."""
    ms = max(1000, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def write_config(
    settings: Settings,
    out_dir: Path,
    *,
    ray_sd_files: list[str] | None = None,
    extra_targets: dict[str, list[str]] | None = None,
) -> Path:
    """Write `out_dir/prometheus.yml` scraping Ray (the local cluster's node on its metrics port;
    with RAY_ADDRESS or `ray_sd_files`, the nodes Ray's service-discovery file lists), the drift
    monitor, the promotion controller, and any `extra_targets` (job name -> `host:port` list)."""
    interval = _duration(settings.monitoring.scrape_interval_s)
    if ray_sd_files is None and not os.environ.get("RAY_ADDRESS"):
        # The local cluster (asrops/raycluster.py) is this machine's one node, exporting on the
        # port we gave it. Ray's service-discovery file is no guide to it: it lies at a fixed
        # path (/tmp/ray) that any other Ray started on the machine rewrites with its own port,
        # after which every ray_asrops_* series went missing (it failed the suite that way).
        ray_targets: dict = {"static_configs": [{"targets": [f"127.0.0.1:{settings.monitoring.ray_metrics_port}"]}]}
    else:
        ray_targets = {
            # Ray rewrites the file as nodes come and go; it may not exist yet when we start,
            # so re-read it often rather than rely on a watch of a missing directory.
            "file_sd_configs": [{"files": list(ray_sd_files or [RAY_SD_FILE]), "refresh_interval": "10s"}],
            # This Prometheus runs beside Ray, on this machine: scrape on loopback whatever
            # address Ray advertises (a cluster uses the Prometheus Operator's PodMonitor, k8s/).
            "relabel_configs": [{
                "source_labels": ["__address__"], "regex": r".*:(\d+)",
                "target_label": "__address__", "replacement": "127.0.0.1:$1",
            }],
        }
    scrape_configs: list[dict] = [
        {"job_name": RAY_JOB, "scrape_interval": _duration(settings.monitoring.ray_scrape_interval_s), **ray_targets},
        {
            "job_name": MONITOR_JOB,
            "static_configs": [{"targets": [f"127.0.0.1:{settings.monitoring.monitor_port}"]}],
        },
        {
            "job_name": CONTROLLER_JOB,
            "static_configs": [{"targets": [f"127.0.0.1:{settings.promotion.metrics_port}"]}],
        },
    ]
    for job, targets in (extra_targets or {}).items():
        if job in (RAY_JOB, MONITOR_JOB, CONTROLLER_JOB):
            raise ValueError(f"extra target job {job!r} clashes with a built-in job")
        scrape_configs.append({"job_name": job, "static_configs": [{"targets": list(targets)}]})
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(ALERT_RULES_FILE)],
        "scrape_configs": scrape_configs,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class PrometheusServer:
    """A local Prometheus process (the embedded deployment's; at scale the Prometheus Operator
    runs it). `start()` returns once the server answers `/-/ready`."""

    def __init__(
        self,
        settings: Settings,
        out_dir: Path,
        *,
        ray_sd_files: list[str] | None = None,
        extra_targets: dict[str, list[str]] | None = None,
        ready_timeout_s: float = 60.0,
    ):
        self.settings, self.out_dir = settings, Path(out_dir)
        self.port = settings.monitoring.prometheus_port
        self.ray_sd_files, self.extra_targets = ray_sd_files, extra_targets
        self.ready_timeout_s = ready_timeout_s
        self.log_file = self.out_dir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        if self._proc is not None:
            return self
        binary = shutil.which(self.settings.monitoring.prometheus_binary)
        if binary is None:
            raise PrometheusError(
                f"Prometheus binary {self.settings.monitoring.prometheus_binary!r} not found; "
                "install Debian's prometheus package: apt-get install prometheus"
            )
        config = write_config(
            self.settings, self.out_dir,
            ray_sd_files=self.ray_sd_files, extra_targets=self.extra_targets,
        )
        with self.log_file.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.out_dir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=functools.partial(os.nice, self.settings.monitoring.background_niceness),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        client = PrometheusClient(self.url, timeout_s=1.0)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise PrometheusError(
                    f"Prometheus exited with code {code} while starting on {self.url}; "
                    f"its log ({self.log_file}) ends with:\n{self.log_tail()}"
                )
            # Checked after poll(): a ready answer from another server already on our port
            # does not count, since our process would have died on the busy port.
            if client.is_online() and self._proc.poll() is None:
                return
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"Prometheus not ready on {self.url} after {self.ready_timeout_s:.0f} s; "
                    f"its log ({self.log_file}) ends with:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Prometheus flushes its head block), then SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class PrometheusClient:
    """Instant queries over Prometheus's HTTP API: Flagger's metrics-provider shape
    (`query_value` and `is_online`), plus `query` for labelled results."""

    def __init__(self, base_url: str, timeout_s: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def is_online(self) -> bool:
        try:
            response = httpx.get(f"{self.base_url}/-/ready", timeout=self.timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def query(self, promql: str) -> list[Sample]:
        """Evaluate `promql` now; a scalar result comes back as one sample with no labels."""
        try:
            response = httpx.get(
                f"{self.base_url}/api/v1/query",
                params={"query": promql},
                timeout=self.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise PrometheusError(f"Prometheus at {self.base_url} is unreachable: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            raise PrometheusError(
                f"Prometheus at {self.base_url} answered HTTP {response.status_code} "
                f"without JSON: {response.text[:200]!r}"
            ) from None
        if body.get("status") != "success":
            raise PrometheusError(
                f"Prometheus refused {promql!r}: {body.get('errorType', 'error')}: "
                f"{body.get('error', response.text[:200])}"
            )
        data = body["data"]
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [
                Sample(labels=item["metric"], value=float(item["value"][1])) for item in result
            ]
        if kind == "scalar":
            return [Sample(labels={}, value=float(result[1]))]
        raise PrometheusError(f"{promql!r} gives a {kind}, not an instant vector or scalar")

    def targets(self) -> list[ScrapeTarget]:
        """The active scrape targets and how their last scrape went: what to show when a query
        finds no data (a target down, timing out, or never discovered)."""
        try:
            response = httpx.get(f"{self.base_url}/api/v1/targets", params={"state": "active"},
                                 timeout=self.timeout_s)
            active = response.json()["data"]["activeTargets"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise PrometheusError(f"Prometheus at {self.base_url} did not list its targets: {exc}") from exc
        return [
            ScrapeTarget(job=t["labels"].get("job", ""), url=t.get("scrapeUrl", ""), health=t.get("health", ""),
                         last_error=t.get("lastError", ""))
            for t in active
        ]

    def query_value(self, promql: str) -> float | None:
        """The one number `promql` evaluates to, or None when it has no data. No data must be
        read as a failed check by callers, never as a pass."""
        samples = self.query(promql)
        if not samples:
            return None
        if len(samples) > 1:
            raise PrometheusError(
                f"{promql!r} gives {len(samples)} series, not one; aggregate it "
                f"(e.g. sum(...) or max(...)). Labels: {[s.labels for s in samples[:3]]}"
            )
        return samples[0].value

