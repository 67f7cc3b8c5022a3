"""The rendered Envoy config for `url` servers: any path and Host, upstream TLS with the expected
name and a client certificate, static headers read from Envoy's environment, the health check
the config names; each variant accepted by `envoy --mode validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, GatewayConfig, parse_config
from gatewayctl.envoy_config import RenderOptions, envoy_environment, render, validate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("gateway")
    files = {"ca": folder / "ca.pem", "cert": folder / "s.pem", "key": folder / "s.key",
             "client_cert": folder / "c.pem", "client_key": folder / "c.key"}
    ca.cert_pem.write_to_path(files["ca"])
    leaf.cert_chain_pems[0].write_to_path(files["cert"])
    leaf.private_key_pem.write_to_path(files["key"])
    client.cert_chain_pems[0].write_to_path(files["client_cert"])
    client.private_key_pem.write_to_path(files["client_key"])
    return {k: str(v) for k, v in files.items()}


def _config(pki: dict[str, str], servers: dict[str, Any]) -> GatewayConfig:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["servers"] = servers
    raw["secrets"] = [*raw.get("secrets", []), "REMOTE_KEY"]
    raw["tls"] = {"cert_file": pki["cert"], "key_file": pki["key"]}
    # Upstream routes only: without the caller assertion, whose route needs its JWKS file here.
    raw.pop("identity", None)
    return parse_config(raw, base_dir=REPO)


def _doc(config: GatewayConfig) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(render(config, RenderOptions(ext_proc=True)))
    return loaded


def _routes(doc: dict[str, Any], server: str) -> list[dict[str, Any]]:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
            if r["name"].startswith(f"{server}_mcp")]


def _cluster(doc: dict[str, Any], server: str) -> dict[str, Any]:
    cluster: dict[str, Any] = next(c for c in doc["static_resources"]["clusters"]
                                   if c["name"] == f"mcp_{server}")
    return cluster


def test_https_server_with_client_certificate(pki: dict[str, str], tmp_path: Path) -> None:
    """Path rewrite, the URL's authority as Host, TLS with SNI, SAN check and client
    certificate, the secret header as an environment reference, Origin removed."""
    config = _config(pki, {"remote": {
        "instances": [{"url": "https://127.0.0.1:8443/v1/mcp"}, {"url": "https://127.0.0.2:8443/v1/mcp"}],
        "tls": {"ca_file": pki["ca"], "client_cert_file": pki["client_cert"],
                "client_key_file": pki["client_key"]},
        "headers": {"authorization": "Bearer ${REMOTE_KEY}"}}})
    text = render(config, RenderOptions(ext_proc=True))
    doc = yaml.safe_load(text)
    for route in _routes(doc, "remote"):
        assert route["route"]["prefix_rewrite"] == "/v1/mcp"
        assert route["route"]["auto_host_rewrite"] is True
        assert "origin" in route["request_headers_to_remove"]
        assert route["request_headers_to_add"] == [
            {"header": {"key": "authorization", "value": "Bearer %ENVIRONMENT(REMOTE_KEY)%"},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    cluster = _cluster(doc, "remote")
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["hostname"] for e in endpoints] == ["127.0.0.1:8443", "127.0.0.2:8443"]
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "127.0.0.1"
    context = tls["common_tls_context"]
    assert context["validation_context"]["trusted_ca"] == {"filename": pki["ca"]}
    assert context["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}]
    assert context["tls_certificates"][0]["private_key"] == {"filename": pki["client_key"]}
    assert cluster["health_checks"][0]["tcp_health_check"] == {}
    assert envoy_environment(config) == ("REMOTE_KEY",)
    (tmp_path / "envoy.yaml").write_text(text, encoding="utf-8")
    validate(tmp_path / "envoy.yaml")


def test_dns_name_host_header_and_health_kinds(pki: dict[str, str], tmp_path: Path) -> None:
    """A DNS name resolves to every replica; host_header wins over the URL's authority; the
    discover check posts a stateless server/discover and expects a result; module servers keep
    /mcp and /ready."""
    config = _config(pki, {
        "plain": {"url": "http://localhost:9000/mcp", "health": "discover",
                  "host_header": "mcp.internal.example"},
        "checked": {"url": "https://localhost/api/mcp", "health_path": "/healthz",
                    "tls": {"server_name": "mcp.internal.example", "ca_file": pki["ca"]}},
        "files": {"module": "mcp_servers.files", "instances": [{"port": 9201}]}})
    doc = _doc(config)
    plain, checked, files = (_cluster(doc, n) for n in ("plain", "checked", "files"))
    assert plain["type"] == "STRICT_DNS" and "transport_socket" not in plain
    assert _routes(doc, "plain")[0]["route"]["host_rewrite_literal"] == "mcp.internal.example"
    check = plain["health_checks"][0]["http_health_check"]
    assert check["method"] == "POST" and check["path"] == "/mcp"
    assert b"server/discover" in bytes.fromhex(check["send"]["text"])
    assert bytes.fromhex(check["receive"][0]["text"]) == b'"result"'
    assert checked["health_checks"][0]["http_health_check"] == {"path": "/healthz"}
    assert checked["transport_socket"]["typed_config"]["sni"] == "mcp.internal.example"
    assert checked["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["hostname"] \
        == "localhost:443"
    assert files["health_checks"][0]["http_health_check"] == {"path": "/ready"}
    assert _routes(doc, "files")[0]["route"]["prefix_rewrite"] == "/mcp"
    assert "auto_host_rewrite" not in _routes(doc, "files")[0]["route"]
    (tmp_path / "envoy.yaml").write_text(render(config, RenderOptions(ext_proc=True)), encoding="utf-8")
    validate(tmp_path / "envoy.yaml")


def test_no_secret_value_is_written(pki: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret's value stays in the environment: the YAML names the variable only."""
    monkeypatch.setenv("REMOTE_KEY", "value-that-must-not-appear")
    config = _config(pki, {"remote": {"url": "http://127.0.0.1:9/mcp",
                                      "headers": {"x-api-key": "${REMOTE_KEY}"}}})
    text = render(config)
    assert "value-that-must-not-appear" not in text and "%ENVIRONMENT(REMOTE_KEY)%" in text
