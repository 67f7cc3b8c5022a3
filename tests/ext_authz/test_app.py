"""Wire tests: a real grpc.aio server on port 0 and a real gRPC client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from ext_authz.app import SERVICE_NAME, Service, start_service
from gateway.telemetry import iter_audit
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    ISSUER,
    PUBLIC_URL,
    JwksServer,
    McpServer,
    StubEngine,
    check_request,
    make_settings,
    token_for,
)
from tests.gateway.telemetry.otlp_receiver import OtlpReceiver
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def service(jwks_server: JwksServer, mcp_server: McpServer
                  ) -> AsyncIterator[tuple[Service, StubEngine]]:
    engine = StubEngine(deny_tools={"delete_file"})
    svc = await start_service(make_settings(jwks_server.url, files_port=mcp_server.port), engine)
    try:
        yield svc, engine
    finally:
        await svc.stop(grace=None)


async def test_check_over_the_wire(service: tuple[Service, StubEngine], rsa_key: SigningKey) -> None:
    """Envoy's Authorization.Check answers allowed and denied requests over real gRPC."""
    svc, engine = service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = pb_grpc.AuthorizationStub(channel)
        ok = await stub.Check(check_request("post_tools_call_files", token_for(rsa_key)), timeout=5)
        assert ok.HasField("ok_response")
        assert {h.header.key for h in ok.ok_response.headers} >= {"x-mcp-user", "x-mcp-tool"}
        no = await stub.Check(check_request("post_tools_list_no_token"), timeout=5)
        assert no.denied_response.status.code == 401
        # Concurrent streams are served by one process.
        many = await asyncio.gather(*(stub.Check(check_request("post_tools_call_files",
                                                               token_for(rsa_key)), timeout=5)
                                      for _ in range(32)))
        assert all(r.HasField("ok_response") for r in many)
    assert engine.started


async def test_health_service(service: tuple[Service, StubEngine]) -> None:
    """The standard gRPC health service reports SERVING, then NOT_SERVING on shutdown."""
    svc, engine = service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs omit the RPCs
        for name in ("", SERVICE_NAME):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    await svc.stop(grace=None)
    assert engine.closed


async def test_jwks_is_warmed_at_start(service: tuple[Service, StubEngine],
                                       jwks_server: JwksServer) -> None:
    """Start-up fetches each issuer's keys once, before reporting SERVING."""
    svc, _ = service
    assert jwks_server.fetches == 1 and svc.jwks[ISSUER].kids == {"rsa-1", "ec-1"}


async def test_module_entry_point_with_real_policy(tmp_path: Path, jwks_server: JwksServer,
                                                   rsa_key: SigningKey) -> None:
    """`python -m ext_authz --config F --port N` serves health and decisions with the real policy."""
    cfg = {
        "public_url": PUBLIC_URL,
        "tls": {"cert_file": "server.pem", "key_file": "server.key"},
        "issuers": [{"issuer": ISSUER, "jwks_url": jwks_server.url}],
        "policy": {"dir": str(ROOT / "policies")},
        "ext_authz": {"transport": "grpc", "instances": [{"port": 9101}]},
        "ext_proc": {"instances": [{"port": 9111}]},
        "servers": {"files": {"module": "m", "instances": [{"port": 9201}]},
                    "database": {"module": "m", "instances": [{"port": 9211}]}},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ext_authz", "--config", str(path), "--port",
                             str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs omit the RPCs
            # NOT_SERVING until the policy is built and the keys are warm: poll, bounded.
            deadline = time.monotonic() + 30
            while True:
                resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                          timeout=30, wait_for_ready=True)
                if resp.status == health_pb2.HealthCheckResponse.SERVING \
                        or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.AuthorizationStub(channel)
            denied = await stub.Check(check_request("post_tools_list_no_token"), timeout=5)
            assert denied.denied_response.status.code == 401
            token = token_for(rsa_key, roles=["engineer"], scopes=[])
            listed = await stub.Check(check_request("post_tools_list_no_token", token), timeout=5)
            assert listed.HasField("ok_response")
            call: pb.CheckResponse = await stub.Check(
                check_request("post_tools_call_files", token), timeout=5)
            assert call.denied_response.status.code == 403
            challenge = {h.header.key: h.header.value for h in call.denied_response.headers}
            assert 'error="insufficient_scope"' in challenge["www-authenticate"]
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b'"decision_id"' in out and token.encode() not in out + err


def test_duplicate_issuer_rejected_at_start() -> None:
    """Two entries for one issuer are a config error (issuers are selected by iss)."""
    from ext_authz.settings import Settings
    from gateway.config import ConfigError
    from tests.ext_authz.conftest import make_config
    cfg = make_config("http://127.0.0.1:1/jwks.json", issuers=[
        {"issuer": ISSUER, "jwks_url": "http://a/jwks"}, {"issuer": ISSUER, "jwks_url": "http://b/jwks"}])
    with pytest.raises(ConfigError):
        Settings.from_config(cfg)


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def _scrape(port: int) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_metrics_endpoint_moves(service: tuple[Service, StubEngine], rsa_key: SigningKey) -> None:
    """/metrics on the metrics port shows request, latency and catalog series that move."""
    svc, _ = service
    key = (("decision", "allow"), ("method", "tools/call"), ("server", "files"),
           ("tool", "read_file"))
    before = _samples(await _scrape(svc.metrics_port), "mcp_gateway_requests_total").get(key, 0.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = pb_grpc.AuthorizationStub(channel)
        for _ in range(3):
            ok = await stub.Check(check_request("post_tools_call_files", token_for(rsa_key)), timeout=5)
            assert ok.HasField("ok_response")
    text = await _scrape(svc.metrics_port)
    assert _samples(text, "mcp_gateway_requests_total")[key] == before + 3
    assert _samples(text, "mcp_gateway_decision_duration_seconds_count")[(("decision", "allow"),)] >= 3
    assert _samples(text, "mcp_gateway_quarantined_tools")[(("server", "files"),)] == 0
    assert _samples(text, "mcp_gateway_jwks_fetches_total")[(("issuer", ISSUER), ("outcome", "ok"))] >= 1
    assert _samples(text, "mcp_gateway_audit_entries_total")[(("outcome", "written"),)] >= 3


async def test_audit_file_holds_the_entry_when_the_answer_arrives(
        service: tuple[Service, StubEngine], rsa_key: SigningKey) -> None:
    """Over the wire: once the client has the answer, its entry is in <audit.dir>/ext_authz-<port>.jsonl."""
    svc, _ = service
    assert svc.audit.path.name == f"ext_authz-{svc.port}.jsonl"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = pb_grpc.AuthorizationStub(channel)
        ok = await stub.Check(check_request("post_tools_call_files", token_for(rsa_key)), timeout=5)
        decision_id = {h.header.key: h.header.value for h in ok.ok_response.headers}["x-mcp-decision-id"]
        entries = [e for e in iter_audit(svc.audit.path) if e["decision_id"] == decision_id]
    assert len(entries) == 1 and entries[0]["status"] == "allowed"


async def test_span_continues_the_callers_trace(jwks_server: JwksServer, mcp_server: McpServer,
                                                rsa_key: SigningKey) -> None:
    """With an OTLP endpoint, each Check exports a SERVER span whose parent is the traceparent's."""
    receiver = OtlpReceiver()
    await receiver.start()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        settings = make_settings(jwks_server.url, files_port=mcp_server.port,
                                 telemetry={"otlp_endpoint": f"http://{receiver.endpoint}"})
        svc = await start_service(settings, StubEngine())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
                stub = pb_grpc.AuthorizationStub(channel)
                req = check_request("post_tools_call_files", token_for(rsa_key),
                                    headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
                assert (await stub.Check(req, timeout=5)).HasField("ok_response")
            audited = list(iter_audit(svc.audit.path))
        finally:
            await svc.stop(grace=None)  # flushes the span processor

        def ours() -> list[Span]:
            return [s for svc_name, s in receiver.spans
                    if svc_name == "ext_authz" and s.trace_id.hex() == trace_id]

        await receiver.wait_for(lambda: bool(ours()))
    finally:
        await receiver.stop()
    span = ours()[0]
    assert span.name == "ext_authz.check" and span.kind == Span.SPAN_KIND_SERVER
    assert span.parent_span_id.hex() == parent_id
    attrs = {a.key: a.value.string_value for a in span.attributes}
    assert attrs["mcp.method"] == "tools/call" and attrs["mcp.tool"] == "read_file"
    assert attrs["decision"] == "allow"
    assert audited[-1]["trace_id"] == trace_id
