"""The one adapter to Evidently: a drift report of a current window against a reference,
returned as our own typed `DriftResult`, and saved as Evidently's HTML plus our JSON.

Nothing outside this module imports Evidently; its API changed in 0.7 and will again.

How a window is scored:
- Columns are those of `DriftSettings` (numeric, categorical, the transcript text) present in
  both frames. Evidently's `DataDriftPreset` over the numeric and categorical ones (one
  `ValueDrift` per column inside) and a `ValueDrift` on the text, each with its stat test and
  threshold from the settings (None = Evidently's default, chosen by reference size).
- A column with no values in either frame gets an error and no score, and is left out.
- Text drift is a TF-IDF domain classifier that raises ("After pruning, no terms remain") on
  transcripts with a tiny vocabulary; when the report raises, the text column is run on its
  own and the other columns together, so one failing column cannot sink the window.
- drift_share = drifted columns / columns with a result; the window is drifted when the share
  reaches `settings.drift_share` (Evidently's "dataset drift").

Evidently 0.7 facts this relies on (read from the installed source, 0.7.23):
- `Report(metrics, include_tests=True).run(current, reference)` -- current first.
- `ValueDrift(column, method, threshold)`; in `Snapshot.dict()["metrics"]` each has
  `config = {"type": "evidently:metric_v2:ValueDrift", "column", "method", "threshold"}` and
  `value` (the drift score: a p-value for tests, a distance for distances). An auto-chosen
  method is reported by its display name ("K-S p_value"), an explicit one by its id ("ks").
- Whether a column drifted is its test in `Snapshot.dict()["tests"]`: `status` "FAIL" =
  drifted, "SUCCESS" = not, linked by `metric_config.metric_id` to the metric's `id`.
- Text drift with a reference of <= 1000 rows compares the domain classifier's ROC AUC with a
  null distribution, `legacy.utils.data_drift_utils.roc_auc_random_classifier_percentile`,
  looked up in that module at every call: `random_classifier_auc_percentile` below replaces it
  with the same numbers at a hundredth of the CPU.
- `Snapshot.save_html()` silently writes nothing when given a `Path`, so we write
  `get_html_str(as_iframe=False)` ourselves.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.core.metric_types import metric_tests_widget
from evidently.core.report import Snapshot, metric_tests_stats
from evidently.core.serialization import ReportModel, SnapshotModel
from evidently.legacy.model.widget import BaseWidgetInfo
from evidently.legacy.renderers.html_widgets import CounterData, counter
from evidently.legacy.utils import data_drift_utils
from evidently.metrics import ValueDrift
from evidently.presets import DataDriftPreset
from pydantic import BaseModel

from asrops.settings import DriftSettings

ColumnKind = Literal["numeric", "categorical", "text"]

JSON_FORMAT = "asrops.drift/1"
VALUE_DRIFT_TYPE = "evidently:metric_v2:ValueDrift"  # a metric's config["type"] in Snapshot.dict()
REFERENCE_SEED = 0
"""Seed of the reference sample, so the same reference gives the same report."""


def random_classifier_auc_percentile(y_test, p_value: float = 0.05, iter_num: int = 1000, seed: int = 42) -> float:
    """Evidently's null distribution for text drift (`roc_auc_random_classifier_percentile`, its
    method with a reference of <= 1000 rows): the `1 - p_value` percentile of the ROC AUCs of
    `iter_num` random scorings of `y_test`, seeded as Evidently seeds them. Evidently calls
    sklearn's `roc_auc_score` 1000 times, and its input checks made this 3.3-4.0 s a call, most
    of a window's 6-7 s of CPU on 2 cores beside the serving replicas; here the same AUCs come from ranks (the
    Mann-Whitney form, ties averaged as the trapezoid counts them) in one pass, equal to
    Evidently's to 1e-12 (tests/test_drift.py), and NumPy's global generator is left as
    Evidently's leaves it."""
    from scipy.stats import rankdata

    y = np.asarray(y_test)
    np.random.seed(seed)
    seeds = np.random.randint(0, iter_num * 10, size=iter_num)
    scores = np.empty((iter_num, len(y)))
    for i, s in enumerate(seeds):
        np.random.seed(s)
        scores[i] = np.random.rand(len(y))
    classes = np.unique(y)
    if len(classes) != 2:
        return float("nan")  # what sklearn's AUC of one class is (with a warning), so Evidently's percentile
    positive = y == classes[1]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores, axis=1)
    aucs = (ranks[:, positive].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(np.percentile(aucs, 100 * (1 - p_value)))


EVIDENTLY_RANDOM_AUC_PERCENTILE = getattr(data_drift_utils, "roc_auc_random_classifier_percentile", None)
"""Evidently's own, kept to check ours against; ours replaces it (its text drift looks it up
in its module at every call). Should Evidently move it, nothing is replaced: only slower."""
if EVIDENTLY_RANDOM_AUC_PERCENTILE is not None:
    data_drift_utils.roc_auc_random_classifier_percentile = random_classifier_auc_percentile


class ColumnDrift(BaseModel):
    column: str
    kind: ColumnKind
    method: str
    """Evidently's stat test: the configured id (`ks`, `wasserstein`, ...) or, when left to
    Evidently, the display name of the one it chose (`K-S p_value`); "default" when unscored."""
    threshold: float | None
    score: float | None
    """p-value for a test (drift when below the threshold), distance or ROC AUC otherwise
    (drift when above); None when the column has no result."""
    drifted: bool
    error: str | None = None
    """Why the column has no result; such a column is left out of the drift share."""

    @property
    def has_result(self) -> bool:
        return self.error is None


class DriftResult(BaseModel):
    drift_share: float
    """Drifted columns / columns with a result (0 when none has a result)."""
    share_threshold: float
    """`settings.drift_share` at the time: the share that makes the window drifted."""
    drifted: bool
    n_current: int
    n_reference: int
    """Reference rows used, after sampling down to `settings.reference_rows`."""
    columns: list[ColumnDrift]
    computed_at: datetime

    @property
    def scored_columns(self) -> list[ColumnDrift]:
        return [c for c in self.columns if c.has_result]

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    def column(self, name: str) -> ColumnDrift:
        for c in self.columns:
            if c.column == name:
                return c
        raise KeyError(name)


@dataclass(frozen=True)
class DriftRun:
    """Our result plus the Evidently snapshot it came from: one snapshot even when the window
    needed several reports, with our summary and the unscored columns on top of its page."""

    result: DriftResult
    snapshot: Snapshot


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    json: Path


@dataclass(frozen=True)
class _Plan:
    column: str
    kind: ColumnKind
    method: str | None
    threshold: float | None


def compute_drift(
    current: pd.DataFrame, reference: pd.DataFrame, settings: DriftSettings
) -> DriftRun:
    """Score each configured column of `current` against `reference` (sampled down to
    `settings.reference_rows`). Never raises for a column's sake: it gets an error instead."""
    if len(reference) > settings.reference_rows:
        reference = reference.sample(n=settings.reference_rows, random_state=REFERENCE_SEED)
    plans = _plan(current, reference, settings)
    columns, model = _score(plans, current, reference)
    ordered = [columns[p.column] for p in plans]
    scored = [c for c in ordered if c.has_result]
    share = sum(c.drifted for c in scored) / len(scored) if scored else 0.0
    result = DriftResult(
        drift_share=share,
        share_threshold=settings.drift_share,
        drifted=bool(scored) and share >= settings.drift_share,
        n_current=len(current),
        n_reference=len(reference),
        columns=ordered,
        computed_at=datetime.now(UTC),
    )
    model.widgets = _summary_widgets(result) + model.widgets
    _show_every_row(model.widgets)
    return DriftRun(result=result, snapshot=Snapshot.load_model(model))


def save_reports(run: DriftRun, out_dir: Path, stem: str) -> ReportPaths:
    """Write `<stem>.html` (Evidently's self-contained page) and `<stem>.json` (our result,
    plus Evidently's own `Snapshot.dict()` under "evidently"). Each file appears whole or not
    at all (written aside, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(html=out_dir / f"{stem}.html", json=out_dir / f"{stem}.json")
    html = run.snapshot.get_html_str(as_iframe=False)
    evidently = json.loads(run.snapshot.json())  # Evidently's numpy-safe encoder
    doc = {
        "format": JSON_FORMAT,
        "result": run.result.model_dump(mode="json"),
        "evidently": evidently,
    }
    _write_atomic(paths.html, html)
    _write_atomic(paths.json, json.dumps(doc, indent=1))
    return paths


def load_result(json_path: Path) -> DriftResult:
    doc = json.loads(Path(json_path).read_text(encoding="utf-8"))
    if doc.get("format") != JSON_FORMAT:
        raise ValueError(f"{json_path}: not an asrops drift result ({doc.get('format')=})")
    return DriftResult.model_validate(doc["result"])


# --- planning ---------------------------------------------------------------------------


def _plan(current: pd.DataFrame, reference: pd.DataFrame, s: DriftSettings) -> list[_Plan]:
    kinds: list[tuple[str, ColumnKind, str | None]] = [
        *((c, "numeric", s.numeric_method) for c in s.numeric_features),
        *((c, "categorical", s.categorical_method) for c in s.categorical_features),
        *([(s.text_feature, "text", s.text_method)] if s.text_feature else []),
    ]
    seen: set[str] = set()
    plans = []
    for column, kind, default_method in kinds:
        if column in seen or column not in current.columns or column not in reference.columns:
            continue
        seen.add(column)
        method = s.column_methods.get(column, default_method)
        plans.append(_Plan(column, kind, method, s.column_thresholds.get(column)))
    return plans


def _missing_reason(current: pd.DataFrame, reference: pd.DataFrame, column: str) -> str | None:
    empty = [name for name, df in (("current", current), ("reference", reference))
             if not df[column].notna().any()]
    return f"no values in {' and '.join(empty)} data" if empty else None


def _datasets(
    current: pd.DataFrame, reference: pd.DataFrame, plans: list[_Plan]
) -> tuple[Dataset, Dataset]:
    """The planned columns of both frames with explicit kinds: numerics as floats (NaN where
    missing; Evidently drops those rows per column), categoricals as one type in both frames
    (16000 and 16000.0, an int column that met a NaN, are one category), text as str."""
    frames: tuple[dict[str, pd.Series], dict[str, pd.Series]] = ({}, {})
    for p in plans:
        pair = (current[p.column], reference[p.column])
        if p.kind == "numeric":
            converted = [pd.to_numeric(s, errors="coerce").astype("float64") for s in pair]
        elif p.kind == "categorical" and all(_all_numbers(s) for s in pair):
            converted = [pd.to_numeric(s).astype("float64") for s in pair]
        else:
            converted = [s.where(s.isna(), s.astype(str)) for s in pair]
        for frame, series in zip(frames, converted, strict=True):
            frame[p.column] = series.reset_index(drop=True)
    definition = DataDefinition(
        numerical_columns=[p.column for p in plans if p.kind == "numeric"],
        categorical_columns=[p.column for p in plans if p.kind == "categorical"],
        text_columns=[p.column for p in plans if p.kind == "text"],
    )
    cur, ref = (Dataset.from_pandas(pd.DataFrame(f, index=pd.RangeIndex(len(df))),
                                    data_definition=definition)
                for f, df in zip(frames, (current, reference), strict=True))
    return cur, ref


def _all_numbers(s: pd.Series) -> bool:
    return bool(pd.to_numeric(s, errors="coerce").notna().sum() == s.notna().sum())


# --- running ----------------------------------------------------------------------------


def _score(
    plans: list[_Plan], current: pd.DataFrame, reference: pd.DataFrame
) -> tuple[dict[str, ColumnDrift], SnapshotModel]:
    """Every planned column's outcome, and one snapshot model of all the reports run."""
    columns: dict[str, ColumnDrift] = {}
    runnable: list[_Plan] = []
    for p in plans:
        missing = _missing_reason(current, reference, p.column)
        if missing:
            columns[p.column] = _failed(p, missing)
        else:
            runnable.append(p)
    snapshots, errors = _run_isolating(runnable, *_datasets(current, reference, runnable))
    for p in runnable:
        if p.column in errors:
            columns[p.column] = _failed(p, errors[p.column])
    model = _merge(snapshots)
    for c in _read_columns(Snapshot.load_model(model).dict(), {p.column: p for p in runnable}):
        columns[c.column] = c
    return columns, model


def _run(plans: list[_Plan], current: Dataset, reference: Dataset) -> Snapshot:
    """Evidently's DataDriftPreset over the numeric and categorical columns (one ValueDrift each,
    plus its own drifted-columns count for the page) and a ValueDrift for the transcript text."""
    tabular = [p for p in plans if p.kind != "text"]
    metrics: list = []
    if tabular:
        metrics.append(DataDriftPreset(
            columns=[p.column for p in tabular],
            per_column_method={p.column: p.method for p in tabular if p.method} or None,
            per_column_threshold={p.column: p.threshold for p in tabular if p.threshold is not None} or None,
        ))
    metrics += [ValueDrift(column=p.column, method=p.method, threshold=p.threshold)
                for p in plans if p.kind == "text"]
    # The preset's page correlates the window's numeric columns; one that is constant in a window
    # (no clipping at all, say) has zero spread, and numpy warned on the console at every such
    # window. No score or verdict reads that matrix.
    with np.errstate(divide="ignore", invalid="ignore"):
        return Report(metrics, include_tests=True).run(current, reference)


def _run_isolating(
    plans: list[_Plan], current: Dataset, reference: Dataset
) -> tuple[list[Snapshot], dict[str, str]]:
    """Run all columns in one report; if it raises, run text columns (the known fragile
    kind) each on its own and the rest together, down to one column per report."""
    if not plans:
        return [], {}
    try:
        return [_run(plans, current, reference)], {}
    except Exception as exc:
        if len(plans) == 1:
            return [], {plans[0].column: f"{type(exc).__name__}: {exc}"}
    fragile = [p for p in plans if p.kind == "text"]
    sturdy = [p for p in plans if p.kind != "text"]
    groups = [[p] for p in fragile] + [sturdy] if fragile and sturdy else [[p] for p in plans]
    snapshots: list[Snapshot] = []
    errors: dict[str, str] = {}
    for group in groups:
        s, e = _run_isolating(group, current, reference)
        snapshots += s
        errors.update(e)
    return snapshots, errors


def _merge(snapshots: list[Snapshot]) -> SnapshotModel:
    """One snapshot (one HTML page, one dict) out of the reports a window needed (maybe none)."""
    if not snapshots:
        return SnapshotModel(report=ReportModel(items=[]), name=None, timestamp=datetime.now(),
                             metadata={}, tags=[], metric_results={}, top_level_metrics=[],
                             widgets=[], tests_widgets=[])
    model = snapshots[0].to_snapshot_model()
    if len(snapshots) == 1:
        return model
    for other in snapshots[1:]:
        m = other.to_snapshot_model()
        model.metric_results.update(m.metric_results)
        model.top_level_metrics += m.top_level_metrics
        model.widgets += m.widgets
    tests = [t for mid in model.top_level_metrics for t in model.metric_results[mid].tests]
    model.tests_widgets = [metric_tests_stats(tests), metric_tests_widget(tests)] if tests else []
    return model


def _show_every_row(widgets: list[BaseWidgetInfo]) -> None:
    """Evidently's drift table shows 10 columns a page; ours has ~17, and an SRE should see every
    feature without paging."""
    for w in widgets:
        params = w.params if isinstance(w.params, dict) else {}
        if "rowsPerPage" in params and isinstance(params.get("data"), list):
            params["rowsPerPage"] = max(len(params["data"]), 1)
        _show_every_row(list(w.widgets or []))


def _summary_widgets(result: DriftResult) -> list[BaseWidgetInfo]:
    """Our verdict for the window on top of the page, and every column that has no result
    (those have no Evidently widget of their own)."""
    scored = result.scored_columns
    summary = counter(counters=[
        CounterData(
            f"share {result.drift_share:.2f}, threshold {result.share_threshold:.2f}; "
            f"{result.n_current} current rows, {result.n_reference} reference rows",
            f"Window {'drifted' if result.drifted else 'not drifted'}: "
            f"{len(result.drifted_columns)} of {len(scored)} scored columns drifted",
        )
    ])
    failed = [counter(counters=[CounterData(c.error or "", f"No result for column '{c.column}'")])
              for c in result.columns if not c.has_result]
    return [summary, *failed]


# --- reading ----------------------------------------------------------------------------


def _read_columns(snapshot_dict: dict[str, Any], plans: dict[str, _Plan]) -> list[ColumnDrift]:
    status = {t["metric_config"]["metric_id"]: t["status"] for t in snapshot_dict["tests"]}
    out = []
    for m in snapshot_dict["metrics"]:
        config = m.get("config", {})
        if config.get("type") != VALUE_DRIFT_TYPE or config.get("column") not in plans:
            continue
        plan = plans[config["column"]]
        score = _float_or_none(m.get("value"))
        test = str(getattr(status.get(m["id"]), "value", status.get(m["id"]))).upper()
        error = None if test in ("FAIL", "SUCCESS") else f"Evidently's drift test status is {test}"
        out.append(ColumnDrift(
            column=plan.column,
            kind=plan.kind,
            method=str(config.get("method") or plan.method or "default"),
            threshold=_float_or_none(config.get("threshold")),
            score=score,
            drifted=error is None and test == "FAIL",
            error=error,
        ))
    return out


def _failed(plan: _Plan, error: str) -> ColumnDrift:
    return ColumnDrift(column=plan.column, kind=plan.kind, method=plan.method or "default",
                       threshold=plan.threshold, score=None, drifted=False, error=error)


def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --- writing ----------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

