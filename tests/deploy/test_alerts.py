"""The Prometheus alert rules (deploy/prometheus/alerts.yaml) and the Grafana dashboard checked
statically: they parse, every rule waits (``for:``) and carries a severity, the compose Prometheus
loads the file, and every mcp_gateway_* series they read is defined in our metrics modules. The
envoy_* series are checked against a running Envoy in tests/e2e/test_observability_e2e.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter, Gauge, Histogram

from gateway.telemetry import metrics
from mcp_aggregator import fanout

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "mcp-gateway.json"
PROMETHEUS = REPO / "deploy" / "compose" / "prometheus.yml"
COMPOSE = REPO / "docker-compose.yml"
SEVERITIES = {"critical", "warning"}
# Series Prometheus makes itself for every scrape target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "bool", "offset"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTORS = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_IDENTIFIER = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression reads: identifiers left once strings, label
    selectors, ranges and grouping clauses are removed, minus function calls and keywords."""
    bare = _SELECTORS.sub(" ", _GROUPINGS.sub(" ", _STRINGS.sub('""', expr)))
    return {name for name, call in _IDENTIFIER.findall(bare)
            if not call and name not in PROMQL_KEYWORDS}


def rules() -> list[dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def defined_series() -> set[str]:
    """Every sample name our Python services can expose (gateway/telemetry/metrics.py and the
    aggregator's fan-out counters)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix
            for module in (metrics, fanout) for collector in vars(module).values()
            if isinstance(collector, Counter | Gauge | Histogram)
            for family in collector.describe() for suffix in suffixes[family.type]}


def test_metric_names_of_an_expression() -> None:
    """The name extraction keeps series and drops functions, labels, strings, ranges and groupings."""
    expr = ('sum by (instance, code) (rate(mcp_gateway_ext_proc_failures_total{code="x_total"}[5m]))'
            " / on(instance) group_left up > 0 and envoy_cluster_membership_total")
    assert metric_names(expr) == {"mcp_gateway_ext_proc_failures_total", "up",
                                  "envoy_cluster_membership_total"}


def test_rules_parse_wait_and_carry_a_severity() -> None:
    """Every rule is an alert with an expression, a ``for:`` duration, a known severity and a
    summary; alert names are unique."""
    found = rules()
    assert found
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names))
    for rule in found:
        assert isinstance(rule["expr"], str) and metric_names(rule["expr"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_rules_cover_the_failures_that_matter() -> None:
    """There are rules for all instances of a cluster unhealthy, lasting ejections, ext_authz
    errors, ext_proc errors and timeouts, circuit-breaker overflows and a process down."""
    by_name = {rule["alert"]: metric_names(rule["expr"]) for rule in rules()}
    assert {"envoy_cluster_membership_healthy"} <= by_name["UpstreamAllInstancesUnhealthy"]
    assert {"envoy_cluster_outlier_detection_ejections_active"} <= by_name["UpstreamEjectionLasting"]
    assert {"envoy_http_ext_authz_error", "envoy_http_ext_authz_ok"} <= by_name["ExtAuthzErrorRateHigh"]
    assert {"envoy_http_ext_proc_streams_failed",
            "envoy_http_ext_proc_message_timeouts"} <= by_name["ExtProcErrors"]
    assert {"envoy_cluster_upstream_rq_pending_overflow",
            "envoy_cluster_upstream_cx_overflow"} <= by_name["UpstreamCircuitBreakerOverflow"]
    assert by_name["GatewayProcessDown"] == {"up"}
    ejection = next(rule for rule in rules() if rule["alert"] == "UpstreamEjectionLasting")
    assert ejection["for"] == "5m"


def test_ext_authz_alert_fires_above_one_percent_of_checks() -> None:
    """The ext_authz alert is the error share of all checks (ok + denied + error) above 1%."""
    rule = next(rule for rule in rules() if rule["alert"] == "ExtAuthzErrorRateHigh")
    assert re.search(r">\s*0\.01\s*$", rule["expr"].strip())
    assert rule["for"] == "5m" and rule["labels"]["severity"] == "critical"


def test_our_series_are_defined() -> None:
    """Each series the rules and the dashboard read is ours and defined in a metrics module,
    Envoy's (envoy_*, checked against a running Envoy by the e2e test) or made by Prometheus."""
    used = {name for rule in rules() for name in metric_names(rule["expr"])}
    used |= {name for expr in dashboard_exprs() for name in metric_names(expr)}
    ours = {name for name in used if name.startswith("mcp_gateway_")}
    assert ours and ours <= defined_series()
    assert used - ours - SYNTHETIC == {name for name in used if name.startswith("envoy_")}


def test_dashboard_covers_upstream_health_and_filter_errors() -> None:
    """The dashboard shows upstream health, ejections, circuit-breaker overflows, retries and
    ext_authz / ext_proc errors."""
    used = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    assert {"envoy_cluster_membership_healthy", "envoy_cluster_membership_total",
            "envoy_cluster_outlier_detection_ejections_active",
            "envoy_cluster_outlier_detection_ejections_enforced_total",
            "envoy_cluster_upstream_rq_pending_overflow", "envoy_cluster_upstream_cx_overflow",
            "envoy_cluster_upstream_rq_retry", "envoy_cluster_upstream_rq_retry_success",
            "envoy_http_ext_authz_error", "envoy_http_ext_authz_denied",
            "envoy_http_ext_authz_failure_mode_allowed", "envoy_http_ext_proc_streams_failed",
            "envoy_http_ext_proc_message_timeouts", "mcp_gateway_ext_proc_failures_total",
            "mcp_gateway_requests_total"} <= used


def test_compose_prometheus_loads_the_rules() -> None:
    """docker-compose.yml mounts the rules file where deploy/compose/prometheus.yml's rule_files
    look for it."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS.read_text())
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["prometheus"]["volumes"])
    assert config["rule_files"] == [mounts["./deploy/prometheus/alerts.yaml"]]
