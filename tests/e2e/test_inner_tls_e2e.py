"""mTLS on every inner hop through the real stack (inner_tls on): Envoy reaches ext_authz (HTTP
and gRPC mode), ext_proc, a module server, a stdio server's bridge and the aggregator over TLS
with its client certificate; the aggregator reaches Envoy's inner listener with its own. A
client that goes straight to a component's port without the gateway's client certificate (or
with another CA's) fails the TLS handshake; one holding another component's certificate from the
inner CA is refused unless that component may call this one. Every certificate rotates under
load without a failed request, and the new one is served afterwards."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
import trustme
from cryptography import x509
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import inner_tls
from gateway.config import GatewayConfig, load_config
from gatewayctl import devstack
from gatewayctl.devstack.credentials import inner_client_context, issue_inner_tls
from tests.e2e.conftest import HAS_EXT_PROC, installed
from tests.e2e.conftest import test_policy as policy_with_pii
from tests.e2e.helpers import (
    MODERN,
    MODERN_META,
    REPO,
    bearer,
    envoy_stat,
    stack_config,
    stateless_call,
    tls_context,
    wait_until,
)
from tests.e2e.pii_server import CARD, EMAIL
from tests.ports import free_ports

pytestmark = pytest.mark.skipif(not HAS_EXT_PROC, reason="needs ext_proc")

START_SECONDS = 60.0
HANDSHAKE_SECONDS = 5.0
KEYS = "MCP_GATEWAY_AGGREGATE_KEYS"
TOY = REPO / "tests" / "mcp_bridge" / "toy_server.py"
# The rotation's load: this many calls in flight at once, for as long as the rotation takes.
LOAD_WORKERS = 4


@pytest.fixture(scope="module", params=["http", "grpc"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[devstack.Stack]:
    missing = [m for m in ("ext_authz.__main__", "mcp_aggregator.__main__", "mcp_bridge.__main__")
               if not installed(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp(f"inner-tls-{request.param}")
    policies = policy_with_pii(tmp / "policies")
    data_file = policies / "data.json"
    data: dict[str, Any] = json.loads(data_file.read_text())
    data["gateway"]["servers"]["toy"] = {"tenants": ["*"]}
    data["gateway"]["roles"]["admin"]["tools"]["toy"] = ["*"]
    data_file.write_text(json.dumps(data, indent=2))
    aggregator, inner = free_ports(2)
    servers: dict[str, dict[str, Any]] = {
        "pii": {"module": "tests.e2e.pii_server", "count": 1},
        "toy": {"command": [sys.executable, str(TOY)], "count": 1},
    }
    extra = {
        "policy": {"engine": "embedded", "dir": str(policies)},
        "secrets": [KEYS],
        "aggregate": {"instances": [{"port": aggregator}], "inner_listener": {"port": inner},
                      "session_keys": KEYS},
        "inner_tls": {"enabled": True},
        # As shipped in compose and Kubernetes: the servers take the caller from the gateway's
        # signed assertion only, so both trust mechanisms run together here.
        "identity": {"assertion": True},
        # The rotation test's unpaced load must never meet the per-user limit (50/s by default):
        # every failure it counts is then the rotation's.
        "rate_limits": {"backend": "memory", "per_user": {"rate_per_second": 100000,
                                                          "burst": 100000}},
    }
    path = stack_config(tmp, servers=servers, ext_authz=1, extra=extra,
                        authz_transport=request.param)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))
        with devstack.running(load_config(path), ext_proc=True,
                              startup_timeout=START_SECONDS) as running:
            yield running


def _component(stack: devstack.Stack, name: str) -> devstack.Component:
    return next(c for c in stack.components if c.name == name)


def _refused(port: int, client: ssl.SSLContext) -> bool:
    """The component refused this client: the handshake failed (with TLS 1.3 the server's alert
    arrives with the first read) or the connection closed without an answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_SECONDS) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return conn.recv(4096) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def _served(port: int, client: ssl.SSLContext) -> bytes:
    """The certificate (DER) the component presents to ``client`` after a full handshake."""
    client.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_SECONDS) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        return der


def _plain_http_refused(port: int) -> bool:
    """A plain-text HTTP request gets no HTTP answer (the port speaks TLS only)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_SECONDS) as conn:
            conn.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = conn.recv(4096)
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        return True
    return not reply.startswith(b"HTTP/")


def test_status_and_metrics_reach_the_components_over_mtls(stack: devstack.Stack) -> None:
    """`status` probes each component with the gateway's client certificate (all healthy, and
    Envoy sees them healthy through the same TLS), and a server's same-port /metrics is https,
    answers that certificate only, and is what `up`'s banner checks it with."""
    rows = devstack.status(stack.config)
    assert rows and all(row["healthy"] for row in rows), rows
    assert all(row["envoy"] in (None, "healthy") for row in rows), rows
    pii = _component(stack, "pii")
    assert pii.probe.tls_name == "server-pii.mcp-gateway.internal"
    assert pii.metrics_url is not None and pii.metrics_url.startswith("https://")
    with urllib.request.urlopen(pii.metrics_url, timeout=5,  # noqa: S310  (loopback, https)
                                context=inner_client_context(stack.config)) as reply:
        assert reply.status == 200
    # `up`'s banner lists it: asked with the certificate it answers, without it it does not.
    assert devstack.serves_metrics(pii.metrics_url, inner_client_context(stack.config))
    assert not devstack.serves_metrics(pii.metrics_url, inner_tls.client_context(
        None, ca_file=stack.config.inner_tls.ca_file, check_hostname=False))


async def test_tools_call_through_every_inner_hop_over_mtls(stack: devstack.Stack) -> None:
    """A viewer's call to the module server is authorized by ext_authz and masked by ext_proc,
    an admin's call reaches the stdio server through its bridge: each hop a TLS connection."""
    reply = await stateless_call(stack, "pii", bearer(stack.config, "viewer"), "contact")
    assert reply.status_code == 200, reply.text
    assert "Alice Smith" in reply.text and EMAIL not in reply.text and CARD not in reply.text
    assert "[REDACTED:email]" in reply.text
    toy = await stateless_call(stack, "toy", bearer(stack.config, "admin"), "pid")
    assert toy.status_code == 200 and '"isError"' not in toy.text.replace('"isError":false', ""), toy.text
    denied = await stateless_call(stack, "toy", bearer(stack.config, "viewer"), "pid")
    assert denied.status_code == 403
    for cluster in ("ext_authz", "ext_proc", "mcp_pii", "mcp_toy"):
        assert envoy_stat(stack.config, f"cluster.{cluster}.ssl.handshake") > 0, cluster


async def test_aggregate_legs_reach_the_inner_listener_over_mtls(stack: devstack.Stack) -> None:
    """/mcp's tools/list is answered by the aggregator from legs on Envoy's inner listener, which
    admits the aggregator only with its client certificate."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": MODERN_META}}
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=20) as http:
        reply = await http.post(stack.config.aggregate_url(), json=body, headers={
            "authorization": f"Bearer {bearer(stack.config, 'admin')}",
            "content-type": "application/json", "accept": "application/json, text/event-stream",
            "mcp-protocol-version": MODERN, "mcp-method": "tools/list"})
    assert reply.status_code == 200, reply.text
    assert "pii__contact" in reply.text and "toy__pid" in reply.text
    assert envoy_stat(stack.config, "cluster.aggregator.ssl.handshake") > 0
    inner = stack.config.aggregate.inner_listener
    assert inner is not None
    assert envoy_stat(stack.config, f"listener.127.0.0.1_{inner.port}.ssl.handshake") > 0


def test_direct_clients_without_the_gateway_certificate_fail_the_handshake(
        stack: devstack.Stack, tmp_path: Path) -> None:
    """Straight to a server's, the bridge's, ext_authz's, ext_proc's or the aggregator's port:
    no client certificate, or one from another CA, fails the handshake; plain text gets no
    answer; the gateway's certificate gets through (the port does speak TLS)."""
    config = stack.config
    ca_file = config.inner_tls.ca_file
    stranger_ca = trustme.CA()
    stranger = stranger_ca.issue_cert("envoy.mcp-gateway.internal")
    stranger.cert_chain_pems[0].write_to_path(tmp_path / "c.pem")
    stranger.private_key_pem.write_to_path(tmp_path / "c.key")
    # A server's certificate from the right CA is no client certificate either.
    server_files = config.inner_tls.files(inner_tls.server_identity("pii"))
    for name in ("pii", "toy", "ext_authz", "ext_proc", "aggregator"):
        port = _component(stack, name).port
        anonymous = inner_tls.client_context(None, ca_file=ca_file, check_hostname=False)
        foreign = inner_tls.client_context(
            inner_tls.TlsFiles(str(tmp_path / "c.pem"), str(tmp_path / "c.key"), ca_file),
            check_hostname=False)
        wrong_use = inner_tls.client_context(server_files, check_hostname=False)
        assert _refused(port, anonymous), name
        assert _refused(port, foreign), name
        assert _refused(port, wrong_use), name
        assert _plain_http_refused(port), name
        assert _served(port, inner_client_context(config)), name


def _http_status(port: int, files: inner_tls.TlsFiles, method: str, path: str,
                 body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One HTTP exchange over TLS with ``files``' certificate: the status and the JSON body."""
    context = inner_tls.client_context(files, check_hostname=False)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=HANDSHAKE_SECONDS, context=context)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json",
                                                         "accept": "application/json, text/event-stream",
                                                         **(headers or {})})
        reply = conn.getresponse()
        data = reply.read()
        is_json = reply.getheader("content-type", "").startswith("application/json")
        return reply.status, json.loads(data) if is_json and data else None
    finally:
        conn.close()


def _grpc_refusal(port: int, files: inner_tls.TlsFiles, tls_name: str, *, check: bool) -> Any:
    """The status code of an ext_authz Check (``check``) or a health Check with ``files``."""
    creds = grpc.ssl_channel_credentials(Path(files.ca_file).read_bytes(),
                                         Path(files.key_file).read_bytes(),
                                         Path(files.cert_file).read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                             options=[("grpc.ssl_target_name_override", tls_name)]) as channel:
        try:
            if check:
                stub: Any = external_auth_pb2_grpc.AuthorizationStub(channel)  # untyped stub
                stub.Check(external_auth_pb2.CheckRequest(), timeout=HANDSHAKE_SECONDS)
            else:
                stub = health_pb2_grpc.HealthStub(channel)
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HANDSHAKE_SECONDS)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_inner_certificates_reach_only_the_components_they_may_call(stack: devstack.Stack) -> None:
    """Who may call whom: with the aggregator's or ext_authz's certificate (from the inner CA)
    a direct call to ext_authz's /check with a user's token, to ext_proc or to the aggregator is
    refused (403 / PERMISSION_DENIED, peer_not_allowed); a server or bridge refuses the
    aggregator's but lets ext_authz's through (its catalog fetch); Envoy's reaches them all."""
    config = stack.config
    it = config.inner_tls
    envoy, aggregator, authz = (it.files(i) for i in (inner_tls.ENVOY, inner_tls.AGGREGATOR,
                                                       inner_tls.EXT_AUTHZ))
    token = {"authorization": f"Bearer {bearer(config, 'admin')}"}
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "contact", "arguments": {}}}).encode()
    ext_authz, ext_proc = _component(stack, "ext_authz"), _component(stack, "ext_proc")
    for files in (aggregator, authz):
        if config.ext_authz.transport == "http":
            status, body = _http_status(ext_authz.port, files, "POST", "/check/mcp/pii", call, token)
            assert status == 403 and body["error"]["data"]["reason"] == "peer_not_allowed", files
        else:
            assert _grpc_refusal(ext_authz.port, files, it.san(inner_tls.EXT_AUTHZ),
                                 check=True) == grpc.StatusCode.PERMISSION_DENIED, files
        assert _grpc_refusal(ext_proc.port, files, it.san(inner_tls.EXT_PROC),
                             check=False) == grpc.StatusCode.PERMISSION_DENIED, files
        status, body = _http_status(_component(stack, "aggregator").port, files, "POST", "/mcp",
                                    call, token)
        assert status == 403 and body["error"]["data"]["reason"] == "peer_not_allowed", files
    assert _grpc_refusal(ext_proc.port, envoy, it.san(inner_tls.EXT_PROC),
                         check=False) == grpc.StatusCode.OK
    for name in ("pii", "toy"):
        port = _component(stack, name).port
        status, body = _http_status(port, aggregator, "POST", "/mcp", call)
        assert status == 403 and body["error"]["data"]["reason"] == "peer_not_allowed", name
        # Past the peer check, the request still needs the gateway's signed assertion.
        for files in (authz, envoy):
            status, body = _http_status(port, files, "POST", "/mcp", call)
            assert status == 401 and body["error"]["data"]["reason"] == "missing", (name, body)


CLUSTERS = ("ext_authz", "ext_proc", "aggregator", "mcp_pii", "mcp_toy")


def _envoy_serials(config: GatewayConfig) -> list[int]:
    """The serial number of Envoy's inner certificate in each TLS context holding it (admin
    /certs; SDS hands the files' contents over, so the entries are found by the name)."""
    url = f"http://{config.admin.host}:{config.admin.port}/certs"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310  (loopback admin URL)
        document = json.loads(reply.read())
    name = {"dns": config.inner_tls.san(inner_tls.ENVOY)}
    return [int(entry["serial_number"], 16) for cert in document.get("certificates", [])
            for entry in cert.get("cert_chain", []) if name in entry.get("subject_alt_names", [])]


def _sds_updates(config: GatewayConfig) -> dict[str, int]:
    """How often each inner cluster's TLS context was rebuilt from SDS."""
    return {c: envoy_stat(config, f"cluster.{c}.client_ssl_socket_factory.ssl_context_update_by_sds")
            for c in CLUSTERS}


async def test_rotating_every_certificate_under_load_drops_no_request(stack: devstack.Stack) -> None:
    """Every inner certificate (Envoy's included) is reissued while calls run: none fails, and
    afterwards each component serves its new certificate and Envoy presents its new one."""
    config = stack.config
    inner = config.aggregate.inner_listener
    token = bearer(config, "viewer")
    updates = _sds_updates(config)
    before = {name: _served(_component(stack, name).port, inner_client_context(config))
              for name in ("pii", "toy", "ext_authz", "ext_proc", "aggregator")}
    failures: list[str] = []
    calls = 0
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal calls
        while not stop.is_set():
            reply = await stateless_call(stack, "pii", token, "contact")
            calls += 1
            if reply.status_code != 200 or "Alice Smith" not in reply.text:
                failures.append(f"{reply.status_code} {reply.text[:200]}")

    workers = [asyncio.create_task(worker()) for _ in range(LOAD_WORKERS)]
    try:
        async with asyncio.timeout(10):
            while calls < 20:
                await asyncio.sleep(0.01)  # let the load build up before rotating
        issued = await asyncio.to_thread(issue_inner_tls, config, only_missing=False)
        assert "envoy" in issued and "ext-authz" in issued
        after: dict[str, bytes] = {}

        def rotated() -> bool:
            for name in before:
                after[name] = _served(_component(stack, name).port, inner_client_context(config))
            return all(after[n] != before[n] for n in before)

        await asyncio.to_thread(wait_until, rotated, "every component to serve its new certificate")
        # Envoy took its new certificate through SDS: the inner listener serves it, every inner
        # cluster's client TLS context was rebuilt and holds it (admin /certs).
        envoy_pem = Path(config.inner_tls.cert_file).read_text().strip()
        serial = x509.load_pem_x509_certificate(envoy_pem.encode()).serial_number
        aggregator = inner_tls.client_context(config.inner_tls.files(inner_tls.AGGREGATOR),
                                              check_hostname=False)
        assert inner is not None

        def envoy_rotated() -> bool:
            served = ssl.DER_cert_to_PEM_cert(_served(inner.port, aggregator)).strip()
            now = _sds_updates(config)
            held = _envoy_serials(config)
            return (served == envoy_pem and all(now[c] > updates[c] for c in CLUSTERS)
                    and len(held) > len(CLUSTERS) and set(held) == {serial})

        await asyncio.to_thread(wait_until, envoy_rotated, "Envoy to take its new certificate")
        mark = calls
        async with asyncio.timeout(20):
            while calls < mark + 20:
                await asyncio.sleep(0.01)  # more calls on the new certificates
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    assert failures == []
    for name, der in after.items():
        files = config.inner_tls.files(
            {"pii": inner_tls.server_identity("pii"), "toy": inner_tls.server_identity("toy"),
             "ext_authz": inner_tls.EXT_AUTHZ, "ext_proc": inner_tls.EXT_PROC,
             "aggregator": inner_tls.AGGREGATOR}[name])
        assert ssl.DER_cert_to_PEM_cert(der).strip() == Path(files.cert_file).read_text().strip(), name
