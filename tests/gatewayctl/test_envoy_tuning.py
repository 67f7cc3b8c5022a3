"""The `envoy:` section: every knob, set globally or per server, reaches the rendered config and
the real Envoy accepts it; a bad value is refused naming its key; a template mistake names the
template file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, parse_config
from gatewayctl import envoy_config
from gatewayctl.envoy_config import EnvoyConfigError, RenderOptions, render
from tests.gatewayctl.test_envoy_config import (
    REPO,
    Certs,
    certs,  # noqa: F401  (fixture)
    clusters,
    hcm,
    routes,
    validate_text,
    with_certs,
)

GLOBAL = {
    "max_heap_bytes": 2 << 30, "max_downstream_connections": 5000,
    "per_connection_buffer_bytes": 65536, "request_headers_timeout_seconds": 5,
    "request_timeout_seconds": 30, "stream_idle_timeout_seconds": 120,
    "connection_idle_timeout_seconds": 900, "http2_max_concurrent_streams": 64,
    "http2_initial_stream_window_bytes": 131072, "http2_initial_connection_window_bytes": 2097152,
    "response_headers": {"strict-transport-security": "max-age=31536000"},
    "upstream": {"connect_timeout_ms": 750, "retries": 1, "max_requests": 300},
}
FILES = {
    "timeout_seconds": 30, "idle_timeout_seconds": 15, "retries": 3, "max_connections": 100,
    "max_pending_requests": 50, "max_requests": 200, "max_retries": 4, "connect_timeout_ms": 250,
    "health_interval_ms": 1500, "health_no_traffic_interval_ms": 3000, "health_timeout_ms": 400,
    "unhealthy_threshold": 3, "healthy_threshold": 2, "outlier_consecutive_5xx": 7,
    "outlier_consecutive_gateway_failure": 4, "outlier_interval_ms": 2500,
    "outlier_base_ejection_ms": 30000, "outlier_max_ejection_percent": 34,
}


def raw_config(**envoy: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["envoy"] = envoy
    return raw


def tuned() -> dict[str, Any]:
    raw = raw_config(**GLOBAL)
    raw["servers"]["files"]["envoy"] = FILES
    return raw


def test_every_knob_reaches_the_rendered_config(certs: Certs, tmp_path: Path) -> None:  # noqa: F811
    config = with_certs(parse_config(tuned(), base_dir=REPO), certs)
    text = render(config, RenderOptions(ext_proc=True))
    doc = yaml.safe_load(text)
    manager = hcm(doc)
    assert manager["request_headers_timeout"] == "5s" and manager["request_timeout"] == "30s"
    assert manager["stream_idle_timeout"] == "120s"
    assert manager["common_http_protocol_options"]["idle_timeout"] == "900s"
    assert manager["http2_protocol_options"]["max_concurrent_streams"] == 64
    assert manager["http2_protocol_options"]["initial_stream_window_size"] == 131072
    assert manager["http2_protocol_options"]["initial_connection_window_size"] == 2097152
    assert manager["route_config"]["virtual_hosts"][0]["response_headers_to_add"][0]["header"] == \
        {"key": "strict-transport-security", "value": "max-age=31536000"}
    monitors = {m["name"]: m["typed_config"] for m in doc["overload_manager"]["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 2 << 30
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"][
        "max_active_downstream_connections"] == 5000
    assert doc["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 65536

    files = clusters(doc)["mcp_files"]
    assert files["connect_timeout"] == "0.25s"
    assert files["circuit_breakers"]["thresholds"][0] == {
        "priority": "DEFAULT", "max_connections": 100, "max_pending_requests": 50,
        "max_requests": 200, "max_retries": 4}
    check = files["health_checks"][0]
    assert (check["timeout"], check["interval"], check["no_traffic_interval"],
            check["unhealthy_threshold"], check["healthy_threshold"]) == ("0.4s", "1.5s", "3s", 3, 2)
    outlier = files["outlier_detection"]
    assert (outlier["consecutive_5xx"], outlier["consecutive_gateway_failure"], outlier["interval"],
            outlier["base_ejection_time"], outlier["max_ejection_percent"]) == (7, 4, "2.5s", "30s", 34)
    for name in ("files_mcp", "files_mcp_inspected"):
        route = routes(doc)[name]["route"]
        assert (route["timeout"], route["idle_timeout"], route["retry_policy"]["num_retries"]) == \
            ("30s", "15s", 3)

    # Another server takes the global upstream defaults, and Envoy's own defaults elsewhere.
    database = clusters(doc)["mcp_database"]
    assert database["connect_timeout"] == "0.75s"
    assert database["circuit_breakers"]["thresholds"][0]["max_requests"] == 300
    assert routes(doc)["database_mcp"]["route"]["retry_policy"]["num_retries"] == 1
    assert routes(doc)["database_mcp"]["route"]["timeout"] == "0s"
    # ext_proc admits the streams of every server together.
    servers = config.servers
    assert clusters(doc)["ext_proc"]["circuit_breakers"]["thresholds"][0]["max_requests"] == \
        sum(s.envoy.max_requests for s in servers)
    validate_text(text, tmp_path)  # the real Envoy accepts every value


def test_access_log_to_a_file(certs: Certs, tmp_path: Path) -> None:  # noqa: F811
    log = tmp_path / "access.log"
    config = with_certs(parse_config(raw_config(access_log_path=str(log)), base_dir=REPO), certs)
    text = render(config)
    sink = hcm(yaml.safe_load(text))["access_log"][0]
    assert sink["name"] == "envoy.access_loggers.file" and sink["typed_config"]["path"] == str(log)
    validate_text(text, tmp_path)


@pytest.mark.parametrize(("where", "key", "bad", "message"), [
    ("envoy", "max_heap_bytes", 1000, r"envoy\.max_heap_bytes must be an integer from"),
    ("envoy", "request_timeout_seconds", -1, r"envoy\.request_timeout_seconds must be a number from 1"),
    ("envoy", "stream_idle_timeout_seconds", "5m", r"envoy\.stream_idle_timeout_seconds must be a number, g"),
    ("envoy", "http2_initial_stream_window_bytes", 100, r"envoy\.http2_initial_stream_window_bytes"),
    ("envoy", "access_log_path", "logs/a.log", r"envoy\.access_log_path must be an absolute path"),
    ("envoy", "response_headers", {"X-Bad Header": "v"}, r"envoy\.response_headers: 'X-Bad Header'"),
    ("envoy", "response_headers", {"x-a": "one\r\ntwo"}, r"envoy\.response_headers: 'x-a'"),
    ("envoy", "retries", 2, r"envoy: unknown key\(s\) retries"),
    ("envoy.upstream", "connect_timeout_ms", 0, r"envoy\.upstream\.connect_timeout_ms must be an integer fr"),
    ("envoy.upstream", "retries", 11, r"envoy\.upstream\.retries must be an integer from 0 to 10"),
    ("files", "timeout_seconds", -3, r"servers\.files\.envoy\.timeout_seconds must be a number from 0"),
    ("files", "outlier_max_ejection_percent", 150, r"servers\.files\.envoy\.outlier_max_ejection_percent"),
    ("files", "health_interval_ms", "2s", r"servers\.files\.envoy\.health_interval_ms must be an integer, "),
    ("files", "max_request", 5, r"servers\.files\.envoy: unknown key\(s\) max_request"),
])
def test_a_bad_knob_is_refused_naming_its_key(where: str, key: str, bad: Any, message: str) -> None:
    raw = raw_config()
    if where == "envoy":
        raw["envoy"] = {key: bad}
    elif where == "envoy.upstream":
        raw["envoy"] = {"upstream": {key: bad}}
    else:
        raw["servers"][where]["envoy"] = {key: bad}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, base_dir=REPO)


def test_a_template_mistake_names_the_template_and_line(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A placeholder without a value is an error naming the template file and its line, not a
    KeyError traceback or a line of a deleted temporary file."""
    folder = tmp_path / "templates"
    folder.mkdir()
    for source in envoy_config.TEMPLATE_DIR.iterdir():
        (folder / source.name).write_text(source.read_text())
    cluster = folder / "server_cluster.yaml.tmpl"
    lines = cluster.read_text().split("\n")
    lines.insert(3, "  # tuned by $no_such_knob")
    cluster.write_text("\n".join(lines))
    monkeypatch.setattr(envoy_config, "TEMPLATE_DIR", folder)
    config = parse_config(raw_config(), base_dir=REPO)
    with pytest.raises(EnvoyConfigError, match=rf"{cluster}:4: \$no_such_knob has no value"):
        render(config)


def test_a_template_overlay_replaces_a_shipped_template(certs: Certs, tmp_path: Path) -> None:  # noqa: F811
    """envoy.templates_dir: a file there replaces the shipped template of the same name (what
    the knobs do not cover, without forking); the others stay the shipped ones."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    shipped = (envoy_config.TEMPLATE_DIR / "server_cluster.yaml.tmpl").read_text()
    assert "lb_policy: RING_HASH" in shipped
    (overlay / "server_cluster.yaml.tmpl").write_text(
        shipped.replace("  lb_policy: RING_HASH\n",
                        "  lb_policy: RING_HASH\n  ignore_health_on_host_removal: true\n"))
    raw = raw_config(templates_dir=str(overlay))
    config = with_certs(parse_config(raw, base_dir=REPO), certs)
    text = render(config)
    doc = yaml.safe_load(text)
    assert all(c.get("ignore_health_on_host_removal") is True
               for name, c in clusters(doc).items() if name.startswith("mcp_"))
    assert "ignore_health_on_host_removal" not in str(clusters(doc)["ext_authz"])
    validate_text(text, tmp_path)
    # Rendering again without the overlay gives the shipped templates back.
    assert "ignore_health_on_host_removal" not in render(parse_config(raw_config(), base_dir=REPO))


def test_a_missing_template_overlay_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"envoy\.templates_dir: .*nowhere is not a folder"):
        parse_config(raw_config(templates_dir=str(tmp_path / "nowhere")), base_dir=REPO)
