"""What `up` prints once the stack is healthy."""

from __future__ import annotations

from pathlib import Path

from gateway.config import load_config
from gatewayctl import devstack


def test_banner_says_where_traces_metrics_and_audit_are(config_file: Path) -> None:
    """The banner names the tracing state, each live /metrics URL and the audit folder."""
    config = load_config(config_file)
    comps = devstack.plan(config, ext_proc=False)
    lines = "\n".join(devstack.observability_lines(config, comps, live=lambda url: "stats" in url))
    assert "Traces: off" in lines
    assert f"http://{config.admin.host}:{config.admin.port}/stats/prometheus" in lines
    assert "/metrics" not in lines  # none of the stand-ins serves one
    assert f"Audit trail (JSON lines, one file per process): {config.audit.dir}/" in lines
