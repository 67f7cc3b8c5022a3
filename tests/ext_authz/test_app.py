"""Wire tests: a real grpc.aio server on port 0 and a real gRPC client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz.app import SERVICE_NAME, Service, start_service
from gateway.tokens import SigningKey
from tests.ext_authz.conftest import (
    ISSUER,
    PUBLIC_URL,
    JwksServer,
    StubEngine,
    check_request,
    make_settings,
    token_for,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def service(jwks_server: JwksServer) -> AsyncIterator[tuple[Service, StubEngine]]:
    engine = StubEngine(deny_tools={"delete_file"})
    svc = await start_service(make_settings(jwks_server.url), engine)
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
        "ext_authz": {"instances": [{"port": 9101}]},
        "ext_proc": {"instances": [{"port": 9111}]},
        "servers": {"files": {"module": "m", "instances": [{"port": 9201}]},
                    "database": {"module": "m", "instances": [{"port": 9211}]}},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ext_authz", "--config", str(path), "--port",
                             str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs omit the RPCs
            resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                      timeout=30, wait_for_ready=True)
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_duplicate_issuer_rejected_at_start() -> None:
    """Two entries for one issuer are a config error (issuers are selected by iss)."""
    from ext_authz.settings import Settings
    from gateway.config import ConfigError
    from tests.ext_authz.conftest import make_config
    cfg = make_config("http://127.0.0.1:1/jwks.json", issuers=[
        {"issuer": ISSUER, "jwks_url": "http://a/jwks"}, {"issuer": ISSUER, "jwks_url": "http://b/jwks"}])
    with pytest.raises(ConfigError):
        Settings.from_config(cfg)
