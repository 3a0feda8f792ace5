"""Ray for every process that needs it: start a local cluster (the embedded default) or join one."""

from __future__ import annotations

import logging
import os

import ray

from asrops.settings import Settings


def init_ray(settings: Settings) -> None:
    """Start (or join, with RAY_ADDRESS) Ray."""
    # Ray starts its workers at nice 15, so on a small node any ordinary process (Ray's own
    # GCS and raylet, a load generator, a log shipper) takes the CPU from our replicas, which
    # are the node's whole purpose. An operator's explicit setting still wins.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # a cluster (or, inside a Ray job, the job's own cluster)
        ray.init(logging_level=logging.WARNING, configure_logging=True)
        return
    # The dashboard process is what writes the service-discovery file listing each node's
    # metrics endpoint for Prometheus; it also serves the Ray Jobs API that retrains go through.
    ray.init(
        include_dashboard=True,
        _metrics_export_port=settings.monitoring.ray_metrics_port,
        logging_level=logging.WARNING,
        configure_logging=True,
        runtime_env={"env_vars": {"ASROPS_DATA_DIR": str(settings.data_dir)}},
    )
