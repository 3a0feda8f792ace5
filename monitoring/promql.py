"""Every PromQL expression asrops ships (dashboard panels, recording and alerting rules, the
promotion controller's queries), each with the query to evaluate to see it has data. Tests
check them with promtool and against the
metric names the service exports; a live check can run each `query` against a real service."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from asrops.monitoring.dashboards import ROWS
from asrops.monitoring.prometheus import ALERT_RULES_FILE
from asrops.promotion.checks import every_query

_GRAFANA_VARIABLES = ("$__rate_interval", "$__interval", "$__range")
_ALERT_FORM = re.compile(
    r"^(?P<query>.+)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>[-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$",
    re.DOTALL,
)
_ABSENT_FORM = re.compile(r"^absent\((?P<query>.+)\)$", re.DOTALL)
_TOP_LEVEL_FILTER = re.compile(r"==|!=|>=|<=|>|<|\b(?:and|or|unless)\b")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_NUMBER = re.compile(r"(?<![\w:])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2",
}


class CheckedExpression(BaseModel):
    source: str
    """Where it comes from: "dashboard: <panel title>", "alert: <name>", "record: <name>" or
    "promotion: <check>"."""
    expr: str
    """The expression as written."""
    query: str
    """What to evaluate to expect data: Grafana's variables replaced by 1m; for an alert, the
    left side of its comparison (or the argument of `absent`); for a promotion check, the
    query over any version in a 1m window."""


def alert_query(expr: str) -> str:
    """The `<query>` of an alert expr `<query> <comparison> <number>` or `absent(<query>)`.
    The query itself must not filter at its top level (no comparison, and/or/unless), or
    evaluating it could rightly return nothing and prove nothing."""
    expr = expr.strip()
    if absent := _ABSENT_FORM.match(expr):
        query = absent["query"].strip()
    elif match := _ALERT_FORM.match(expr):
        query = match["query"].strip()
    else:
        query = ""
    if not query or _TOP_LEVEL_FILTER.search(_top_level(query)):
        raise ValueError(f"alert expr is not `<query> <comparison> <number>` nor absent(...): {expr!r}")
    return query


def _top_level(expr: str) -> str:
    """`expr` with strings and everything inside (), [] and {} blanked out."""
    text, depth, out = _STRING.sub('""', expr), 0, []
    for char in text:
        depth += char in "([{"
        out.append(char if depth == 0 else " ")
        depth -= char in ")]}"
    return "".join(out)


def dashboard_query(expr: str) -> str:
    for variable in _GRAFANA_VARIABLES:
        expr = expr.replace(variable, "1m")
    return expr


def promotion_query(template: str) -> str:
    """A promotion query as it can be checked without knowing a version: any version, 1m."""
    return template.replace('model_version="$version"', 'model_version=~".+"').replace("$window", "1m")


def rule_groups(path: Path = ALERT_RULES_FILE) -> list[dict]:
    return yaml.safe_load(path.read_text())["groups"]


def expressions_to_check() -> list[CheckedExpression]:
    """Dashboard targets, then recording rules and alerts in file order, then the promotion
    controller's queries."""
    checked = [
        CheckedExpression(source=f"dashboard: {panel.title}", expr=q.expr, query=dashboard_query(q.expr))
        for row in ROWS
        for panel in row.panels
        for q in panel.queries
    ]
    for group in rule_groups():
        for rule in group["rules"]:
            expr = rule["expr"].strip()
            if "record" in rule:
                checked.append(CheckedExpression(source=f"record: {rule['record']}", expr=expr, query=expr))
            else:
                checked.append(
                    CheckedExpression(source=f"alert: {rule['alert']}", expr=expr, query=alert_query(expr))
                )
    checked += [CheckedExpression(source=f"promotion: {name}", expr=template, query=promotion_query(template))
                for name, template in every_query().items()]
    return checked


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: every bare name that is not a function, keyword,
    label (inside {...} or by (...)), string, duration or number."""
    text = _STRING.sub(" ", dashboard_query(expr))
    for pattern in (_BRACES, _BRACKETS, _LABEL_LIST, _OFFSET, _NUMBER):
        text = pattern.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(name)
    return names
