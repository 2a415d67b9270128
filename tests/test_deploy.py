"""``deploy/``: the Grafana dashboard and the Prometheus alert rules use only metrics a running service exports.

The names are taken from every PromQL expression (label matchers, strings, durations, grouping
clauses and function calls removed) and compared with a scrape of ``/metrics`` of a real
service; the rule file must also be valid YAML in Prometheus's rule-file format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.api_fixtures import Api, api

__all__ = ["api"]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tollway-dashboard.json"
RULES = DEPLOY / "prometheus" / "tollway-alerts.yml"
PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
)
RULE_KEYS = frozenset({"alert", "expr", "for", "keep_firing_for", "labels", "annotations"})
DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d|w|y)$")
SEVERITIES = frozenset({"critical", "warning"})


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads."""
    text = re.sub(r'"[^"]*"', "", expr)  # strings (in label matchers)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations, $__rate_interval
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"\b[0-9][0-9.]*(e[+-]?[0-9]+)?\b", "", text)  # numbers such as 0.99 and 1e6
    words = [
        m.group() for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text) if not re.match(r"\s*\(", text[m.end() :])
    ]
    return {word for word in words if word not in PROMQL_WORDS}


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


async def exported(api: Api) -> set[str]:
    response = await api.http.get("/metrics")
    assert 200 == response.status_code
    return {sample.name for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metric_names_are_parsed_from_promql() -> None:
    """Functions, label matchers, grouping labels, durations and numbers are not taken for metric names."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(wal_fsync_duration_seconds_bucket{job="x"}[5m]))) > 0.05 * up / 1e6'
    )
    assert {"wal_fsync_duration_seconds_bucket", "up"} == metric_names(expr)


async def test_the_dashboard_uses_only_exported_metrics(api: Api) -> None:
    """Every metric a Grafana panel queries is in a running service's /metrics."""
    used = set().union(*(metric_names(expr) for expr in dashboard_expressions()))
    assert len(used) >= 20
    assert [] == sorted(used - await exported(api))


async def test_the_alert_rules_use_only_exported_metrics(api: Api) -> None:
    """Every metric an alert rule reads is in a running service's /metrics."""
    used = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert len(used) >= 10
    assert [] == sorted(used - await exported(api))


def test_the_rule_file_is_in_prometheus_rule_format() -> None:
    """Groups of uniquely named alerts, each with an expression, a duration, a severity and a summary."""
    document = yaml.safe_load(RULES.read_text())
    assert ["groups"] == list(document)
    for group in document["groups"]:
        assert (True, True) == (isinstance(group["name"], str), isinstance(group["rules"], list))
    problems = [
        rule.get("alert")
        for rule in rules()
        if not RULE_KEYS.issuperset(rule)
        or not isinstance(rule.get("alert"), str)
        or not isinstance(rule.get("expr"), str)
        or not DURATION.match(rule.get("for", "0s"))
        or rule.get("labels", {}).get("severity") not in SEVERITIES
        or not all(isinstance(v, str) for v in (*rule["labels"].values(), *rule.get("annotations", {}).values()))
        or "summary" not in rule.get("annotations", {})
    ]
    names = [rule["alert"] for rule in rules()]
    assert ([], len(names)) == (problems, len(set(names)))


def test_the_dashboard_is_importable() -> None:
    """Unique panel ids, a grid position each, a Prometheus datasource input and a query in every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert all({"x", "y", "w", "h"} <= set(panel["gridPos"]) for panel in panels)
    assert ["DS_PROMETHEUS"] == [item["name"] for item in dashboard["__inputs"]]
    assert [] == [p["title"] for p in panels if p["type"] != "row" and not all(t["expr"] for t in p["targets"])]


def test_the_docker_build_context_is_only_what_the_image_copies() -> None:
    """``.dockerignore`` excludes everything (``.venv`` included) and lets back in exactly what ``COPY`` names."""
    root = DEPLOY.parent
    patterns = [line for line in (root / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    copied = {
        source.rstrip("/")
        for line in (root / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    }
    assert ("*", copied) == (patterns[0], {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")})


def test_the_healthchecks_follow_the_configured_port() -> None:
    """The image's healthcheck asks the port the service listens on, not a hard-coded one."""
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    healthcheck = next(line for line in dockerfile.splitlines() if line.startswith("HEALTHCHECK"))
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())["services"]["tollway"]
    assert (True, False) == ("${TOLLWAY_HTTP_PORT}" in healthcheck, "8080" in healthcheck)
    assert ("8080", False) == (compose["environment"]["TOLLWAY_HTTP_PORT"], "--port" in compose["command"])
