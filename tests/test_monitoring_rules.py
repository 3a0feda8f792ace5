"""Alert rules, the dashboard and the Prometheus adapter, checked with Debian's promtool and a
real Prometheus server; no Ray. The metric names below are the contract with the service: an
expression that reads any other name (a typo, a renamed metric) fails here, not on a dashboard
that silently shows "No data"."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from asrops.monitoring.dashboards import DASHBOARD_FILE, build_dashboard
from asrops.monitoring.prometheus import (
    ALERT_RULES_FILE,
    PrometheusClient,
    PrometheusError,
    PrometheusServer,
    write_config,
)
from asrops.monitoring.promql import alert_query, expressions_to_check, metric_names, rule_groups
from asrops.settings import MonitoringSettings, Settings
from loadtests.service_bench import free_port
from tests.ports import held_port

_COUNTERS_AND_GAUGES = {
    "ray_asrops_requests_total",
    "ray_asrops_decode_errors_total",
    "ray_asrops_client_audio_seconds_total",
    "ray_asrops_fallbacks_total",
    "ray_asrops_breaker_skips_total",
    "ray_asrops_breaker_state",
    "ray_asrops_canary_weight",
    "ray_asrops_shadow_share",
    "ray_asrops_production_log_records_total",
    "ray_asrops_production_log_write_failures_total",
    "ray_asrops_feedback_total",
    "ray_asrops_feedback_word_errors_total",
    "ray_asrops_feedback_reference_words_total",
    "ray_asrops_feedback_retracted_word_errors_total",
    "ray_asrops_feedback_retracted_reference_words_total",
    "ray_asrops_queue_depth",
    "asrops_drift_share",
    "asrops_drift_feature_score",
    "asrops_drift_feature_drifted",
    "asrops_drift_window_samples",
    "asrops_drift_verdict",
    "asrops_drift_verdicts_total",
    "asrops_drift_runs_total",
    "asrops_retrain_jobs",
    "asrops_rollout_phase",
    "asrops_rollout_weight",
    "asrops_rollout_failed_checks",
    "up",
}
_HISTOGRAMS = {
    "ray_asrops_request_duration_seconds",
    "ray_asrops_audio_duration_seconds",
    "ray_asrops_real_time_factor",
    "ray_asrops_segment_neg_avg_logprob",
    "ray_asrops_segment_no_speech_prob",
    "ray_asrops_segment_compression_ratio",
    "ray_asrops_shadow_disagreement_ratio",
    "ray_asrops_batch_size",
}
EXPORTED_METRICS = _COUNTERS_AND_GAUGES | {
    f"{name}{suffix}" for name in _HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
"""Every series name the service, the drift monitor, the promotion controller and Prometheus
itself export (the controller's per-check series only exist once a rollout ran, so no panel
relies on them)."""


def _rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


RECORDED = {rule["record"] for rule in _rules() if "record" in rule}
ALERTS = [rule for rule in _rules() if "alert" in rule]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: install Debian's prometheus package (apt-get install prometheus)"
    return path


def _check_rules(promtool: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)


# --- rules ---------------------------------------------------------------------------------
def test_rules_file_passes_promtool(promtool: str) -> None:
    result = _check_rules(promtool, ALERT_RULES_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_rules_cover_the_failures_an_sre_must_hear_about() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in ALERTS}
    read = {name: metric_names(expr) for name, expr in exprs.items()}

    def alerts_reading(name: str) -> list[str]:
        return [alert for alert, names in read.items() if name in names]

    assert alerts_reading("asrops:request_errors:ratio_rate5m"), "no 5xx ratio alert"
    assert any("latency_slo_burn_rate" in n for names in read.values() for n in names), "no latency SLO alert"
    assert alerts_reading("asrops_drift_verdict"), "no drift verdict alert"
    assert alerts_reading("asrops:breaker_state:max1m"), "no breaker alert"
    assert any(expr.startswith("absent(up{job=\"asrops-monitor\"}") for expr in exprs.values())
    assert any(re.fullmatch(r'up\{job="asrops-monitor"\} == 0', expr) for expr in exprs.values())


@pytest.mark.parametrize("rule", ALERTS, ids=lambda rule: rule["alert"])
def test_alert_is_actionable_and_checkable(rule: dict) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert len(rule["annotations"]["summary"]) > 20
    assert len(rule["annotations"]["description"]) > 80
    query = alert_query(rule["expr"])  # raises unless `<query> <comparison> <number>` / absent()
    assert query and query != rule["expr"].strip()


def test_recording_rules_are_named_by_convention() -> None:
    for name in RECORDED:
        assert re.fullmatch(r"asrops:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_ratio_numerators_that_may_not_exist_yet_are_zero_filled() -> None:
    """With no 5xx so far, the error ratio must be 0, not missing (missing never alerts)."""
    for rule in _rules():
        if 'status=~"5.."' in rule["expr"]:
            assert re.search(r"\bor\b", rule["expr"]), rule.get("record", rule.get("alert"))
        assert " without " not in rule["expr"] and "without(" not in rule["expr"]


def test_alert_query_takes_the_left_side_of_the_comparison() -> None:
    assert alert_query("asrops:x:rate5m > 0.05") == "asrops:x:rate5m"
    assert alert_query('up{job="a"} == 0') == 'up{job="a"}'
    assert alert_query("sum(rate(x[5m])) >= 1e-3") == "sum(rate(x[5m]))"
    assert alert_query('(sum(x{a=~"b|c"}) or vector(0)) > 2') == '(sum(x{a=~"b|c"}) or vector(0))'
    assert alert_query('absent(up{job="a"})') == 'up{job="a"}'
    # A query that itself filters may rightly be empty, so it cannot be checked for data.
    for expr in ("rate(x[5m]) > 1 and y > 2", "a < b > 2", "x unless y == 1", "sum(x)"):
        with pytest.raises(ValueError):
            alert_query(expr)


# --- every expression ----------------------------------------------------------------------
def test_every_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses rules files, so each query becomes a recording rule of a scratch file."""
    checked = expressions_to_check()
    assert len(checked) > 40
    rules = [{"record": f"check:expr_{i}", "expr": c.query} for i, c in enumerate(checked)]
    path = tmp_path / "check.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    result = _check_rules(promtool, path)
    assert result.returncode == 0, result.stdout + result.stderr

    # The trick catches a broken expression (so the check above can fail).
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": [
        {"record": "check:broken", "expr": "sum by (model_version (rate(x[1m]))"}]}]}))
    assert _check_rules(promtool, path).returncode != 0


def test_every_metric_name_is_one_the_service_exports() -> None:
    unknown = {
        c.source: sorted(names)
        for c in expressions_to_check()
        if (names := metric_names(c.expr) - EXPORTED_METRICS - RECORDED)
    }
    assert not unknown, f"expressions read metrics nobody exports: {unknown}"


def test_metric_names_sees_names_not_labels_functions_or_numbers() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model_version) (rate(ray_asrops_typo_bucket'
        '{route="canary", le=~"10|10.0"}[$__rate_interval] offset 1h)))'
        " / ignoring (route) group_left asrops:x:rate5m > 1e3 or vector(0)"
    )
    assert metric_names(expr) == {"ray_asrops_typo_bucket", "asrops:x:rate5m"}


def test_dashboard_shows_every_exported_metric() -> None:
    shown = set().union(*(metric_names(c.expr) for c in expressions_to_check() if c.source.startswith("dashboard:")))
    histograms_shown = {name.rsplit("_", 1)[0] for name in shown if name.endswith(("_bucket", "_sum", "_count"))}
    assert shown | {"up"} >= _COUNTERS_AND_GAUGES, _COUNTERS_AND_GAUGES - shown
    assert histograms_shown >= _HISTOGRAMS, _HISTOGRAMS - histograms_shown


# --- dashboard -----------------------------------------------------------------------------
def test_committed_dashboard_is_what_the_code_builds() -> None:
    assert json.loads(DASHBOARD_FILE.read_text()) == build_dashboard(), (
        "monitoring/grafana/asrops.json is stale: run `python -m monitoring.dashboards`"
    )


def test_dashboard_uses_a_datasource_variable_and_grafana_intervals() -> None:
    dashboard = build_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 25
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]
        for target in panel["targets"]:
            assert set(target) == {"expr", "legendFormat", "refId"}
            # A fixed window would undersample at long time ranges and be empty at short ones.
            for window in re.findall(r"\[([^\]]+)\]", target["expr"]):
                assert window in {"$__rate_interval", "$__range"}, (panel["title"], target["expr"])


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in build_dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


# --- the Prometheus adapter ----------------------------------------------------------------
def test_write_config_is_valid_for_promtool(promtool: str, tmp_path: Path) -> None:
    settings = Settings(monitoring=MonitoringSettings(monitor_port=9999, scrape_interval_s=2.5))
    path = write_config(settings, tmp_path, extra_targets={"fixture": ["127.0.0.1:1234"]})
    config = yaml.safe_load(path.read_text())
    assert config["global"]["scrape_interval"] == "2500ms"
    # Ray's endpoint no more often than Ray's workers refresh it (10 s), the other jobs at 2.5 s.
    assert {job["job_name"]: job.get("scrape_interval") for job in config["scrape_configs"]} == {
        "ray": "10s", "asrops-monitor": None, "asrops-controller": None, "fixture": None}
    assert config["rule_files"] == [str(ALERT_RULES_FILE)] and Path(config["rule_files"][0]).is_absolute()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # The local cluster's own node, on the port it was given: not Ray's service-discovery file,
    # which any other Ray on the machine rewrites with its own port.
    assert jobs["ray"]["static_configs"][0]["targets"] == [f"127.0.0.1:{settings.monitoring.ray_metrics_port}"]
    assert "file_sd_configs" not in jobs["ray"]
    assert jobs["asrops-monitor"]["static_configs"][0]["targets"] == ["127.0.0.1:9999"]
    assert jobs["fixture"]["static_configs"][0]["targets"] == ["127.0.0.1:1234"]
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    joined = yaml.safe_load(write_config(settings, tmp_path, ray_sd_files=["/tmp/ray/x.json"]).read_text())
    ray = next(job for job in joined["scrape_configs"] if job["job_name"] == "ray")
    assert ray["file_sd_configs"][0]["files"] == ["/tmp/ray/x.json"]  # a cluster's nodes, as Ray lists them

    fast = Settings(monitoring=MonitoringSettings(scrape_interval_s=0.2))
    assert yaml.safe_load(write_config(fast, tmp_path).read_text())["global"]["scrape_interval"] == "1s"


@pytest.mark.slow
def test_prometheus_server_scrapes_a_target_and_answers_queries(tmp_path: Path) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    events = prometheus_client.Counter("asrops_fixture_events", "Events of the test's target.",
                                       registry=registry)
    events.inc(7)
    target_port = free_port()
    target, _thread = prometheus_client.start_http_server(target_port, addr="127.0.0.1", registry=registry)
    settings = Settings(monitoring=MonitoringSettings(
        prometheus_port=free_port(), monitor_port=free_port(), scrape_interval_s=1,
    ))
    server = PrometheusServer(settings, tmp_path, ray_sd_files=[str(tmp_path / "no-ray.json")],
                              extra_targets={"fixture": [f"127.0.0.1:{target_port}"]})
    try:
        with server:
            client = PrometheusClient(server.url)
            assert client.is_online()
            query = 'asrops_fixture_events_total{job="fixture"}'
            deadline = time.monotonic() + 30
            while (value := client.query_value(query)) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert value == 7.0, f"target not scraped; log:\n{server.log_tail()}"
            assert client.query_value('asrops_fixture_events_total{job="nothing"}') is None
            assert client.query_value('up{job="fixture"}') == 1.0
            # Nothing listens on the drift monitor's port (its first scrape may come after the fixture's).
            deadline = time.monotonic() + 15
            while not (samples := client.query('up{job="asrops-monitor"}')) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert [s.value for s in samples] == [0.0]
            health = {t.job: (t.health, t.last_error) for t in client.targets()}
            assert health["fixture"] == ("up", "")
            assert health["asrops-monitor"][0] == "down" and "connection refused" in health["asrops-monitor"][1]
            # The rules file is loaded and evaluated: a zero-filled recording exists.
            deadline = time.monotonic() + 15
            recorded = "asrops:production_log_write_failures:rate5m"
            while (failures := client.query_value(recorded)) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert failures == 0.0
            with pytest.raises(PrometheusError, match="bad_data"):
                client.query_value("sum(")
            with pytest.raises(PrometheusError, match="series"):
                client.query_value('up')  # fixture, asrops-monitor: two series, not one
        assert not client.is_online()
        with pytest.raises(PrometheusError, match="unreachable"):
            client.query_value(query)
    finally:
        server.stop()
        target.shutdown()


def test_prometheus_server_says_how_to_install_a_missing_binary(tmp_path: Path) -> None:
    settings = Settings(monitoring=MonitoringSettings(prometheus_binary="no-such-prometheus-binary"))
    with pytest.raises(PrometheusError, match="apt-get install prometheus"):
        PrometheusServer(settings, tmp_path).start()


def test_prometheus_server_reports_a_failed_start_with_its_log(tmp_path: Path) -> None:
    with held_port() as taken:
        settings = Settings(monitoring=MonitoringSettings(prometheus_port=taken))
        with pytest.raises(PrometheusError, match="exited with code") as info:
            PrometheusServer(settings, tmp_path, ready_timeout_s=20).start()
    assert "address already in use" in str(info.value)


# --- the feedback-wer check counts clients, not corrections -----------------------------------
def _feedback_series(client: str, errors_per_min: int, words_per_min: int = 20,
                     retracted_errors_per_min: int = 0) -> list[dict]:
    labels = f'model_version="v1",route="canary",client="{client}"'
    series = [{"series": f"ray_asrops_feedback_word_errors_total{{{labels}}}", "values": f"0+{errors_per_min}x10"},
              {"series": f"ray_asrops_feedback_reference_words_total{{{labels}}}", "values": f"0+{words_per_min}x10"}]
    if retracted_errors_per_min:
        series.append({"series": f"ray_asrops_feedback_retracted_word_errors_total{{{labels}}}",
                       "values": f"0+{retracted_errors_per_min}x10"})
    return series


def _evaluate(promtool: str, tmp_path: Path, series: list[dict], exprs: dict[str, float]) -> None:
    """Evaluates each PromQL expression over `series` with promtool's unit tests (no server)."""
    test = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [{"expr": e, "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": v}]}
                             for e, v in exprs.items()]}]}
    path = tmp_path / "feedback_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_client_cannot_set_or_open_the_feedback_wer_check(promtool: str, tmp_path: Path) -> None:
    from asrops.promotion.checks import DEFAULT_CHECKS, FEEDBACK_CLIENTS
    from asrops.settings import render_query

    check = next(c for c in DEFAULT_CHECKS if c.name == "feedback-wer")
    query, gate = (render_query(q, "v1", "5m") for q in (check.query, check.only_when.query))
    honest = [s for c in "abc" for s in _feedback_series(c, errors_per_min=2)]  # 10 % WER each
    mallory = _feedback_series("mallory", errors_per_min=60)  # 300 % WER, from one key
    # With three honest clients the median is theirs, however bad one key's corrections are.
    _evaluate(promtool, tmp_path, honest + mallory, {query: 0.1, gate: 4})
    # One key alone (or with one other) never reaches the gate.
    assert check.only_when.min == FEEDBACK_CLIENTS == 3
    _evaluate(promtool, tmp_path, mallory + _feedback_series("a", 2), {gate: 2})
    # Retracted errors (corrections replaced by later ones) are taken off.
    _evaluate(promtool, tmp_path, _feedback_series("d", 10, retracted_errors_per_min=10), {query: 0.0})
    with pytest.raises(AssertionError):  # (and the evaluation does compare)
        _evaluate(promtool, tmp_path, _feedback_series("d", 10, retracted_errors_per_min=10), {query: 0.5})
