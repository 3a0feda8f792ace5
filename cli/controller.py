"""`asrops controller`: the promotion controller as a process of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from asrops.cli.common import registry_of, say, setup

if TYPE_CHECKING:
    from asrops.monitoring.prometheus import PrometheusClient
    from asrops.promotion.analysis import Query


def prometheus_query(client: PrometheusClient) -> Query:
    """The analysis asks a `Query`; this one is the Prometheus client's `query_value`, its
    errors turned into the analysis's `QueryFailed` (a failed check, never a pass)."""
    from asrops.monitoring.prometheus import PrometheusError
    from asrops.promotion.analysis import QueryFailed

    def query(promql: str) -> float | None:
        try:
            return client.query_value(promql)
        except PrometheusError as exc:
            raise QueryFailed(str(exc)) from exc
    return query


def controller() -> None:
    """Run the promotion controller: steps canaries up on Prometheus checks, promotes or rolls back."""
    from prometheus_client import start_http_server

    from asrops.monitoring.prometheus import PrometheusClient
    from asrops.promotion.controller import PromotionController
    from asrops.promotion.metrics import ControllerMetrics

    settings = setup()
    metrics = ControllerMetrics()
    host = settings.monitoring.metrics_host
    start_http_server(settings.promotion.metrics_port, addr=host, registry=metrics.registry)
    say(f"promotion controller: Prometheus {settings.prometheus_url}, metrics on "
        f"http://{host}:{settings.promotion.metrics_port}/metrics")
    query = prometheus_query(PrometheusClient(settings.prometheus_url))
    PromotionController(registry_of(settings), settings.promotion.spec(), query, metrics
                        ).run_forever(settings.promotion.poll_s)
