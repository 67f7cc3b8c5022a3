"""Envoy's side of inner_tls: a TLS transport socket with the client certificate and the
expected peer name on every cluster of our own components, the inner listener requiring the
aggregator's certificate, both through SDS files; url servers keep their own TLS settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway.config import GatewayConfig, parse_config
from gatewayctl import devstack, envoy_config
from gatewayctl.devstack.credentials import ensure_inner_tls
from gatewayctl.envoy_config import RenderOptions, render, sds_documents, write_sds_documents
from tests.e2e.helpers import stack_config
from tests.ports import free_ports

UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
SERVERS: dict[str, dict[str, Any]] = {
    "files": {"module": "tests.e2e.standin_upstream"},
    "tools": {"command": ["true"]},
    "remote": {"url": "https://mcp.example.test:8443/mcp",
               "tls": {"ca_file": "remote-ca.pem", "server_name": "mcp.example.test"}},
}


def _config(tmp_path: Path, enabled: bool, transport: str = "grpc") -> GatewayConfig:
    raw = yaml.safe_load(stack_config(tmp_path, servers=SERVERS, authz_transport=transport).read_text())
    agg, inner = free_ports(2)
    raw["aggregate"] = {"instances": [{"port": agg}], "inner_listener": {"port": inner},
                        "session_keys": "AGG_KEYS"}
    raw["secrets"] = [*raw.get("secrets", []), "AGG_KEYS"]
    raw["inner_tls"] = {"enabled": enabled}
    trustme.CA().cert_pem.write_to_path(tmp_path / "remote-ca.pem")
    return parse_config(raw, base_dir=tmp_path)


def _bootstrap(config: GatewayConfig) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(render(config, RenderOptions(ext_proc=True)))
    return document


def _clusters(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in document["static_resources"]["clusters"]}


def _inner_listener(document: dict[str, Any]) -> dict[str, Any]:
    listener: dict[str, Any] = next(x for x in document["static_resources"]["listeners"]
                                    if x["name"] == "mcp_gateway_inner")
    return listener


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_every_inner_cluster_presents_the_client_certificate_and_checks_the_name(
        tmp_path: Path, transport: str) -> None:
    """ext_authz, ext_proc, the module and command servers and the aggregator: TLS with the
    client certificate and CA from SDS, the peer's <identity>.<domain> as SNI and the only SAN
    accepted; HTTP/2 negotiated by ALPN on the gRPC ones."""
    config = _config(tmp_path, True, transport)
    clusters = _clusters(_bootstrap(config))
    sds = str(Path(config.inner_tls.sds_dir) / envoy_config.INNER_CERTIFICATE_SDS)
    expected = {"ext_authz": ("ext-authz", transport == "grpc"), "ext_proc": ("ext-proc", True),
                "mcp_files": ("server-files", False), "mcp_tools": ("server-tools", False),
                "aggregator": ("aggregator", False)}
    for cluster, (identity, h2) in expected.items():
        socket = clusters[cluster]["transport_socket"]["typed_config"]
        san = f"{identity}.mcp-gateway.internal"
        assert socket["@type"] == UPSTREAM and socket["sni"] == san, cluster
        common = socket["common_tls_context"]
        assert common["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"][
            "path"] == sds
        validation = common["combined_validation_context"]
        assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": san}}]
        assert validation["validation_context_sds_secret_config"]["name"] == envoy_config.INNER_CA_SECRET
        assert common.get("alpn_protocols") == (["h2"] if h2 else None), cluster


def test_url_servers_keep_their_own_tls(tmp_path: Path) -> None:
    """A url server's cluster carries its servers.<name>.tls settings, not the inner ones."""
    socket = _clusters(_bootstrap(_config(tmp_path, True)))["mcp_remote"]["transport_socket"]
    remote_ca = str(tmp_path / "remote-ca.pem")
    common = socket["typed_config"]["common_tls_context"]
    assert socket["typed_config"]["sni"] == "mcp.example.test"
    assert common["validation_context"]["trusted_ca"] == {"filename": remote_ca}
    assert "tls_certificate_sds_secret_configs" not in common


def test_inner_listener_requires_the_aggregator_certificate(tmp_path: Path) -> None:
    """The aggregator's way in serves Envoy's certificate and admits only the aggregator's."""
    chain = _inner_listener(_bootstrap(_config(tmp_path, True)))["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["@type"] == DOWNSTREAM and tls["require_client_certificate"] is True
    names = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert names["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "aggregator.mcp-gateway.internal"}}]


def test_off_renders_plain_inner_hops(tmp_path: Path) -> None:
    """inner_tls off (the dev default): no transport socket on our own clusters or the inner
    listener, and no SDS files."""
    config = _config(tmp_path, False)
    document = _bootstrap(config)
    clusters = _clusters(document)
    for name in ("ext_authz", "ext_proc", "mcp_files", "mcp_tools", "aggregator"):
        assert "transport_socket" not in clusters[name], name
    assert "transport_socket" not in _inner_listener(document)["filter_chains"][0]
    assert sds_documents(config) == {}


def test_sds_documents_name_the_files_envoy_watches(tmp_path: Path) -> None:
    """The two SDS files point at Envoy's certificate, key and the CA; written once by rename."""
    config = _config(tmp_path, True)
    written = write_sds_documents(config)
    assert {p.name for p in written} == {envoy_config.INNER_CERTIFICATE_SDS, envoy_config.INNER_CA_SDS}
    cert = yaml.safe_load((Path(config.inner_tls.sds_dir) / envoy_config.INNER_CERTIFICATE_SDS).read_text())
    secret = cert["resources"][0]
    assert secret["name"] == envoy_config.INNER_CERTIFICATE_SECRET
    # The folders are watched: a rename there (the kubelet's ..data swap) reloads the files.
    folder = {"path": str(Path(config.inner_tls.cert_file).parent)}
    assert secret["tls_certificate"] == {"certificate_chain": {"filename": config.inner_tls.cert_file},
                                         "private_key": {"filename": config.inner_tls.key_file},
                                         "watched_directory": folder}
    ca = yaml.safe_load((Path(config.inner_tls.sds_dir) / envoy_config.INNER_CA_SDS).read_text())
    assert ca["resources"][0]["validation_context"] == {
        "trusted_ca": {"filename": config.inner_tls.ca_file},
        "watched_directory": {"path": str(Path(config.inner_tls.ca_file).parent)}}


def test_envoy_accepts_the_rendering_with_and_without_the_files(tmp_path: Path) -> None:
    """With the dev stack's certificates and SDS files Envoy validates the rendering; on a
    machine without them (`config validate --no-files`) stand-ins replace the SDS files too."""
    config = _config(tmp_path, True)
    text = render(config, RenderOptions(ext_proc=True))
    stood_in, missing = envoy_config.stand_in_missing_files(text, tmp_path / "stand-ins")
    sds = Path(config.inner_tls.sds_dir)
    names = (envoy_config.INNER_CERTIFICATE_SDS, envoy_config.INNER_CA_SDS)
    assert {str(sds / name) for name in names} <= set(missing)
    (tmp_path / "stood-in.yaml").write_text(stood_in)
    envoy_config.validate(tmp_path / "stood-in.yaml")
    devstack.ensure_tls(config)
    ensure_inner_tls(config)
    (tmp_path / "envoy.yaml").write_text(text)
    envoy_config.validate(tmp_path / "envoy.yaml")
