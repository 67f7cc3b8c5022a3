"""Metrics through the running stack (issue 6): Envoy's /stats/prometheus on the admin port and
ext_authz's and ext_proc's /metrics move as requests are made; the Envoy series the Grafana
dashboard and the alert rules read exist."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatewayctl import devstack
from tests.deploy.test_alerts import dashboard_exprs, metric_names, rules
from tests.e2e.conftest import HAS_EXT_PROC
from tests.e2e.helpers import bearer, stateless_call


def scrape(url: str, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels``."""
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310  (loopback URL)
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items())


def urls(stack: devstack.Stack) -> dict[str, str]:
    return {c.label: c.metrics_url for c in stack.components if c.metrics_url}


async def test_envoy_and_ext_authz_counters_move(stack: devstack.Stack) -> None:
    """An allowed and a denied tools/call raise Envoy's upstream and downstream counters and
    ext_authz's request counter (allow, and the denial reason)."""
    envoy, authz = urls(stack)["envoy[0]"], urls(stack)["ext_authz[0]"]
    upstream = {"envoy_cluster_name": "mcp_pii"}
    before = (scrape(envoy, "envoy_cluster_upstream_rq_total", **upstream),
              scrape(envoy, "envoy_http_downstream_rq_total", envoy_http_conn_manager_prefix="mcp_gateway"),
              scrape(authz, "mcp_gateway_requests_total", server="pii", decision="allow"),
              scrape(authz, "mcp_gateway_requests_total", server="pii", decision="tool_not_allowed"))
    allowed = await stateless_call(stack, "pii", bearer(stack.config, "admin"), "echo")
    denied = await stateless_call(stack, "pii", bearer(stack.config, "viewer"), "echo")
    assert (allowed.status_code, denied.status_code) == (200, 403)
    after = (scrape(envoy, "envoy_cluster_upstream_rq_total", **upstream),
             scrape(envoy, "envoy_http_downstream_rq_total", envoy_http_conn_manager_prefix="mcp_gateway"),
             scrape(authz, "mcp_gateway_requests_total", server="pii", decision="allow"),
             scrape(authz, "mcp_gateway_requests_total", server="pii", decision="tool_not_allowed"))
    assert after[0] > before[0]
    assert after[1] >= before[1] + 2
    assert after[2] == before[2] + 1 and after[3] == before[3] + 1


def families(url: str) -> set[str]:
    """Names of every series a /metrics or /stats/prometheus endpoint exposes, as written (the
    client parser would add ``_total`` to Envoy's counters; Prometheus does not)."""
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310  (loopback URL)
        text = reply.read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.skipif(not HAS_EXT_PROC, reason="needs ext_proc")
async def test_ext_proc_masking_counter_moves(stack: devstack.Stack) -> None:
    """A masked tools/call answer raises ext_proc's masked values counter on its /metrics."""
    url = urls(stack)["ext_proc[0]"]
    before = sum(scrape(u, "mcp_gateway_masked_values_total", type="email")
                 for label, u in urls(stack).items() if label.startswith("ext_proc["))
    reply = await stateless_call(stack, "pii", bearer(stack.config, "viewer"), "contact")
    assert reply.status_code == 200 and "[REDACTED:email]" in reply.text
    after = sum(scrape(u, "mcp_gateway_masked_values_total", type="email")
                for label, u in urls(stack).items() if label.startswith("ext_proc["))
    assert after > before
    assert "mcp_gateway_masked_values_total" in families(url)


async def test_dashboard_and_alert_envoy_metrics_exist(stack: devstack.Stack) -> None:
    """Every envoy_* series the Grafana dashboard and the Prometheus alert rules read is exposed
    by the real Envoy once a request went through."""
    reply = await stateless_call(stack, "pii", bearer(stack.config, "admin"), "echo")
    assert reply.status_code == 200
    exprs = [*dashboard_exprs(), *(rule["expr"] for rule in rules())]
    wanted = {name for expr in exprs for name in metric_names(expr) if name.startswith("envoy_")}
    assert {"envoy_cluster_membership_healthy", "envoy_http_ext_authz_error",
            "envoy_http_ext_proc_streams_failed"} <= wanted
    if not HAS_EXT_PROC:  # without ext_proc Envoy has no ext_proc filter and so no stats of it
        wanted = {name for name in wanted if not name.startswith("envoy_http_ext_proc_")}
    assert wanted - families(urls(stack)["envoy[0]"]) == set()


def admin_url(stack: devstack.Stack, path: str) -> str:
    admin = stack.config.admin
    return f"http://{admin.host}:{admin.port}{path}"


def test_edge_rate_limit_switches_are_live_runtime_keys(stack: devstack.Stack) -> None:
    """The edge rate limit's runtime keys can be changed through Envoy's admin interface (a
    runtime admin layer exists; without one Envoy answers "No admin layer specified") and are
    removed again by an empty value."""
    def post(query: str) -> tuple[int, str]:
        request = urllib.request.Request(admin_url(stack, f"/runtime_modify?{query}"), method="POST")
        with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310  (loopback URL)
            return reply.status, reply.read().decode()

    def entries() -> dict[str, object]:
        with urllib.request.urlopen(admin_url(stack, "/runtime"), timeout=5) as reply:  # noqa: S310
            document: dict[str, dict[str, object]] = json.load(reply)
        return document["entries"]

    assert post("edge_rate_limit_enforced=0") == (200, "OK\n")
    try:
        assert entries()["edge_rate_limit_enforced"] == {"final_value": "0", "layer_values": ["0"]}
    finally:
        assert post("edge_rate_limit_enforced=")[0] == 200
    assert "edge_rate_limit_enforced" not in entries()
