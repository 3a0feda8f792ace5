"""Monitoring: watching production traffic (installed as `asrops.monitoring`).

- monitor.py: the drift monitor, one Evidently report per window over the production log
  (drift.py runs Evidently; verdict.py turns windows into a verdict; reference.py is what
  windows are compared with);
- prometheus.py: the local Prometheus server (config, alert rules) and its HTTP client;
- dashboards.py, promql.py: the Grafana dashboard as code, and every PromQL expression the
  product ships with what it needs to find data;
- simulate.py: synthetic client traffic (stationary or drifted) for demos and tests.

The metrics themselves are exported where they happen (serve/metrics.py, the monitor, the
promotion controller).
"""
