"""Envoy's own refusals of a rendered config (values our typed checks let through, overlay
templates) are traced back to the gateway key and the template file:line that wrote them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.config import DEFAULT_CONFIG_PATH, parse_config
from gatewayctl import envoy_config
from gatewayctl.envoy_config import RenderOptions, render, render_traced
from gatewayctl.envoy_errors import _UPSTREAM, Trace, envoy_message, field_path
from tests.e2e.helpers import REPO

CLI = [sys.executable, "-m", "gatewayctl.cli"]
CLUSTER_TMPL = REPO / "envoy/templates/server_cluster.yaml.tmpl"


def refusal(tmp_path: Path, raw: dict[str, Any]) -> str:
    """`config validate --no-files` on ``raw`` with the real Envoy; its error output."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = subprocess.run([*CLI, "--config", str(path), "config", "validate", "--no-files",
                           "--ext-proc", "on"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, check=False, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 1, proc.stdout
    return proc.stderr


def default_raw(**envoy: Any) -> dict[str, Any]:
    """The dev config (its relative paths resolve under the test's folder: --no-files stands in
    for the certificates) with this envoy: section."""
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["envoy"] = envoy
    return raw


def overlay(tmp_path: Path, old: str, new: str) -> Path:
    folder = tmp_path / "overlay"
    folder.mkdir()
    text = CLUSTER_TMPL.read_text(encoding="utf-8")
    assert old in text
    (folder / CLUSTER_TMPL.name).write_text(text.replace(old, new), encoding="utf-8")
    return folder


def line_of(path: Path, needle: str) -> int:
    return next(n for n, row in enumerate(path.read_text().split("\n"), 1) if needle in row)


def test_the_traced_rendering_is_the_rendering() -> None:
    """Tracing origins leaves the rendered bytes (and so the digest) exactly as render makes them."""
    config = parse_config(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()), base_dir=REPO)
    for ext_proc in (True, False):
        text, origins = render_traced(config, RenderOptions(ext_proc=ext_proc))
        assert text == render(config, RenderOptions(ext_proc=ext_proc))
        assert len(origins) == len(text.split("\n"))
        unmarked = [row for row, o in zip(text.split("\n"), origins, strict=True)
                    if o is None and row.strip()]
        assert unmarked == []


def test_a_bad_listen_host_names_its_key(tmp_path: Path) -> None:
    """listen.host 'gateway.internal' passes the config checks; Envoy wants an IP and says only
    'malformed IP address': the error names listen.host and the bootstrap template line."""
    raw = default_raw()
    raw["listen"]["host"] = "gateway.internal"
    err = refusal(tmp_path, raw)
    line = line_of(REPO / "envoy/templates/bootstrap.yaml.tmpl", "address: $listen_host")
    assert "malformed IP address: gateway.internal" in err
    assert f"from envoy/templates/bootstrap.yaml.tmpl:{line}" in err
    assert "gateway key: listen.host\n" in err


def test_a_response_header_envoy_refuses_names_envoy_response_headers(tmp_path: Path) -> None:
    """A response header value with an unknown %COMMAND% (Envoy's formatter refuses it) names
    envoy.response_headers and the template line where the renderer wrote the headers."""
    err = refusal(tmp_path, default_raw(response_headers={"x-build": "%BUILD_ID%"}))
    line = line_of(REPO / "envoy/templates/bootstrap.yaml.tmpl", "${response_headers}")
    assert "Not supported field in StreamInfo: BUILD_ID" in err
    assert f"from envoy/templates/bootstrap.yaml.tmpl:{line}" in err
    assert "gateway key: envoy.response_headers" in err


def test_an_overlay_template_value_names_the_overlay_line(tmp_path: Path) -> None:
    """A value written in an envoy.templates_dir template that breaks an Envoy constraint
    names Envoy's field path, the overlay file:line, and that no gateway key sets it."""
    folder = overlay(tmp_path, "healthy_panic_threshold: {value: 0}", "healthy_panic_threshold: {value: 150}")
    err = refusal(tmp_path, default_raw(templates_dir=str(folder)))
    line = line_of(folder / CLUSTER_TMPL.name, "{value: 150}")
    assert "common_lb_config.healthy_panic_threshold.value" in err
    assert f"from {folder / CLUSTER_TMPL.name}:{line} (server " in err
    assert "gateway key: none (the value is written in the template)" in err
    assert "type.googleapis.com" not in err  # Envoy's dump of the whole config is left out


def test_an_overlay_typo_names_the_overlay_line(tmp_path: Path) -> None:
    """An unknown field in an overlay template ('conect_timeout') names the overlay file:line."""
    folder = overlay(tmp_path, "connect_timeout: $connect_timeout", "conect_timeout: $connect_timeout")
    err = refusal(tmp_path, default_raw(templates_dir=str(folder)))
    assert "no such field: 'conect_timeout'" in err
    assert f"from {folder / CLUSTER_TMPL.name}:{line_of(folder / CLUSTER_TMPL.name, 'conect_')}" in err


def test_a_gateway_value_in_an_overlay_field_names_the_server_key(tmp_path: Path) -> None:
    """A placeholder an overlay moved where Envoy refuses its value names the per-server gateway
    key that set it (and the envoy.upstream default it falls back to)."""
    folder = overlay(tmp_path, "healthy_panic_threshold: {value: 0}",
                     "healthy_panic_threshold: {value: $max_requests}")
    raw = default_raw(templates_dir=str(folder))
    err = refusal(tmp_path, raw)
    found = re.search(r"\(server (\S+)\): healthy_panic_threshold.*\n    gateway key: servers\.(\S+)"
                      r"\.envoy\.max_requests \(or envoy\.upstream\.max_requests for every server\)", err)
    assert found and found.group(1) == found.group(2) and found.group(1) in raw["servers"], err


def test_a_negative_duration_in_an_overlay_is_found() -> None:
    """'Invalid duration' names no field: the negative durations of the rendering are pointed at."""
    from gatewayctl.envoy_errors import locate

    text = "a:\n  connect_timeout: -1s\n  interval: 2s\n"
    assert locate("Invalid duration: Expected positive duration seconds: -1", text) == (None, None, [1])


def test_envoy_messages_are_read() -> None:
    """Field paths from both of Envoy's validators; the log prefix and config dump are dropped."""
    pgv = ("[x][critical] error initializing configuration '/f.yaml': dump { } : Proto constraint "
           "validation failed (BootstrapValidationError.StaticResources: embedded | caused by "
           "StaticResourcesValidationError.Clusters[3]: e | caused by ClusterValidationError."
           "OutlierDetection: e | caused by OutlierDetectionValidationError.MaxEjectionPercent: v)")
    assert envoy_message(pgv).startswith("Proto constraint validation failed (Bootstrap")
    assert field_path(envoy_message(pgv)) == [("static_resources", None), ("clusters", 3),
                                              ("outlier_detection", None), ("max_ejection_percent", None)]
    json_at = ("Unable to parse JSON as proto (INVALID_ARGUMENT: invalid JSON in X @ "
               "static_resources.listeners[0].typed_config.<any>.route.timeout: message D, near 1:5 "
               "(offset 4): duration must end with a single 's'): {\"admin\": {}}")
    assert envoy_message(json_at).endswith("single 's')")
    assert field_path(json_at)[-2:] == [("route", None), ("timeout", None)]


def test_every_server_tuning_placeholder_has_its_key() -> None:
    """Every per-server placeholder the renderer fills is mapped to its gateway key."""
    config = parse_config(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()), base_dir=REPO)
    assert set(envoy_config._server_tuning(config.servers[0])) == set(_UPSTREAM)


def test_a_tiny_timeout_renders_as_envoy_reads_it() -> None:
    """A route timeout of 1e-05 s is written in plain decimals (Envoy refuses '1e-05s') and a
    nonzero timeout below a nanosecond never becomes 0s (no timeout)."""
    assert envoy_config._seconds(0.00001) == "0.00001s"
    assert envoy_config._seconds(1e-12) == "0.000000001s"
    assert (envoy_config._seconds(0), envoy_config._seconds(1.5), envoy_config._seconds(86400)) == (
        "0s", "1.5s", "86400s")


def test_a_trace_marks_template_lines_only() -> None:
    """Empty template lines stay unmarked, so blocks keep their exact line breaks."""
    trace = Trace()
    tagged = trace.tag(Path("t.tmpl"), "a: 1\n\nb: 2\n")
    text, origins = trace.finish(tagged)
    assert text == "a: 1\n\nb: 2\n"
    assert [o.line if o else None for o in origins] == [1, None, 3, None]
