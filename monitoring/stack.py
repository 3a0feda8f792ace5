"""The monitoring side of a local run: a Prometheus server and the drift monitor process,
started beside the service by `asrops serve` and stopped with it."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from asrops.settings import Settings
from monitoring.dashboards import DASHBOARD_FILE
from monitoring.prometheus import ALERT_RULES_FILE, PrometheusServer

log = logging.getLogger("asrops.monitoring.stack")


@dataclass
class MonitoringStack:
    prometheus: PrometheusServer | None = None
    monitor: subprocess.Popen | None = None
    controller: subprocess.Popen | None = None
    notes: list[str] = field(default_factory=list)
    """What to tell the operator: where each part is."""

    def stop(self) -> None:
        for process in (self.controller, self.monitor):
            if process and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        if self.prometheus:
            self.prometheus.stop()


def start_monitoring(settings: Settings, say: Callable[[str], None] = log.info) -> MonitoringStack:
    """Start the drift monitor (a process of its own: `asrops monitor`), the promotion controller
    (`asrops controller`) and, when enabled and installed, a local Prometheus scraping Ray's
    nodes, the monitor and the controller."""
    m = settings.monitoring
    stack = MonitoringStack()
    stack.monitor = subprocess.Popen([sys.executable, "-m", "asrops.cli", "monitor", "--bootstrap-reference"])
    stack.notes.append(f"drift monitor: metrics at http://127.0.0.1:{m.monitor_port}/metrics, reports under "
                       f"{settings.production_log_uri}/drift-reports/ (open the .html in a browser)")
    if settings.promotion.enabled:
        stack.controller = subprocess.Popen([sys.executable, "-m", "asrops.cli", "controller"])
        stack.notes.append(f"promotion controller: steps canaries up on Prometheus checks ({settings.prometheus_url}); "
                           "`asrops rollout status` shows its phase and checks")
    if not m.prometheus_enabled:
        stack.notes.append("prometheus: disabled (ASROPS_MONITORING__PROMETHEUS_ENABLED=false)")
    elif shutil.which(m.prometheus_binary) is None:
        stack.notes.append(f"prometheus: '{m.prometheus_binary}' not found; apt-get install prometheus")
    else:
        say("starting Prometheus")
        stack.prometheus = PrometheusServer(settings, settings.data_dir / "prometheus").start()
        stack.notes.append(f"prometheus: {stack.prometheus.url} (alert rules {ALERT_RULES_FILE}; "
                           f"Grafana dashboard to import: {DASHBOARD_FILE})")
    return stack
