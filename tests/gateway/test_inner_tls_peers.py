"""Who may call whom on the inner hops: a certificate of the inner CA is not enough, it must name
a component the service accepts (ext_authz and ext_proc: Envoy; a server: Envoy and ext_authz;
Prometheus's on GET /metrics only), checked on the real ext_authz HTTP front, a real gRPC
service and a real MCP server process loop."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz.http_front import HEALTH_PATH, HttpService
from gateway import eventloop, inner_tls
from gateway.config import Instance
from gateway.errors import FORBIDDEN
from gateway.inner_tls import InnerTlsError, PeerPolicy, TlsFiles
from gateway.service import GrpcService, GrpcSettings
from gatewayctl import compose_init
from mcp_servers.core.app import run_server
from mcp_servers.core.server import MCPServer
from mcp_servers.core.settings import ServerSettings
from tests.ports import free_port

DEADLINE_SECONDS = 10.0
DOMAIN = "mcp-gateway.internal"
TIMEOUT = aiohttp.ClientTimeout(total=DEADLINE_SECONDS)


@dataclass
class Pki:
    folder: Path
    ca: trustme.CA
    ca_file: str

    def files(self, name: str, *names: str) -> TlsFiles:
        """A pair from the inner CA whose SANs are ``names`` (in that order)."""
        out = TlsFiles(str(self.folder / f"{name}.pem"), str(self.folder / f"{name}.key"),
                       self.ca_file)
        leaf = self.ca.issue_cert(*names)
        leaf.private_key_pem.write_to_path(out.key_file)
        leaf.cert_chain_pems[0].write_to_path(out.cert_file)
        return out

    def identity(self, identity: str) -> TlsFiles:
        return self.files(identity, f"{identity}.{DOMAIN}")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    return Pki(tmp_path, ca, str(tmp_path / "ca.pem"))


def _client(files: TlsFiles) -> ssl.SSLContext:
    return inner_tls.client_context(files, check_hostname=False)


# ------------------------------------------------------------------------------ the policy


def test_policy_takes_its_domain_from_its_own_certificate(pki: Pki) -> None:
    """The domain is the service's first DNS name after its label; only the callers' names in
    it are allowed, the scraper's for /metrics only, anything else refused."""
    own = pki.files("server", f"server-files.{DOMAIN}", "127.0.0.1", "localhost")
    policy = PeerPolicy(own.cert_file, inner_tls.SERVER_CALLERS, scraper=True)
    assert policy.domain == DOMAIN
    assert policy.verdict(f"envoy.{DOMAIN}").allowed
    assert policy.verdict(f"EXT-AUTHZ.{DOMAIN}").allowed
    for refused in (f"aggregator.{DOMAIN}", f"ext-proc.{DOMAIN}", "envoy.other.internal",
                    f"x.envoy.{DOMAIN}", "envoy", "", None):
        assert not policy.verdict(refused).allowed, refused
        assert not policy.verdict(refused).admits("GET", "/metrics"), refused
    scraper = policy.verdict(f"{inner_tls.METRICS_SCRAPER}.{DOMAIN}")
    assert not scraper.allowed and scraper.admits("GET", "/metrics")
    assert not scraper.admits("POST", "/metrics") and not scraper.admits("GET", "/mcp")
    assert not PeerPolicy(own.cert_file, inner_tls.SERVER_CALLERS).verdict(
        f"{inner_tls.METRICS_SCRAPER}.{DOMAIN}").admits("GET", "/metrics")


def test_policy_reads_the_first_dns_name_of_a_peer_certificate(pki: Pki) -> None:
    """ssl's decoded certificate: the first DNS entry counts (an IP before it is skipped); a
    certificate without a DNS name is refused."""
    policy = PeerPolicy(pki.identity("ext-authz").cert_file, inner_tls.ENVOY_ONLY)
    envoy = {"subjectAltName": (("IP Address", "127.0.0.1"), ("DNS", f"envoy.{DOMAIN}"),
                                ("DNS", f"aggregator.{DOMAIN}"))}
    assert policy.verdict_for_peercert(envoy).allowed
    second = {"subjectAltName": (("DNS", f"aggregator.{DOMAIN}"), ("DNS", f"envoy.{DOMAIN}"))}
    assert not policy.verdict_for_peercert(second).allowed
    for nothing in ({}, {"subjectAltName": (("IP Address", "127.0.0.1"),)}, None):
        assert not policy.verdict_for_peercert(nothing).allowed


def test_a_service_certificate_without_a_dns_name_is_refused(pki: Pki) -> None:
    """Fail closed: a service whose own certificate names no <identity>.<domain> does not start,
    and the error names the variable."""
    bare = pki.files("bare", "127.0.0.1")
    with pytest.raises(InnerTlsError, match=inner_tls.CERT_ENV):
        PeerPolicy(bare.cert_file, inner_tls.ENVOY_ONLY)
    with pytest.raises(InnerTlsError, match=inner_tls.CERT_ENV):
        inner_tls.server_tls_from_env(bare.env(), callers=inner_tls.ENVOY_ONLY)


def test_a_rotated_certificate_in_another_domain_moves_the_policy(pki: Pki) -> None:
    """The domain follows the service's certificate when it rotates; a rotation to a certificate
    without a DNS name is refused and the old one (and domain) kept."""
    files = pki.identity("ext-authz")
    tls = inner_tls.server_tls_from_env(files.env(), callers=inner_tls.ENVOY_ONLY)
    assert tls is not None and tls.peers is not None and tls.peers.domain == DOMAIN
    moved = pki.ca.issue_cert("ext-authz.gw.example.internal")
    moved.private_key_pem.write_to_path(files.key_file)
    moved.cert_chain_pems[0].write_to_path(files.cert_file)
    assert tls.check() and tls.peers.domain == "gw.example.internal"
    assert tls.peers.verdict("envoy.gw.example.internal").allowed
    assert not tls.peers.verdict(f"envoy.{DOMAIN}").allowed
    bare = pki.ca.issue_cert("127.0.0.1")
    bare.private_key_pem.write_to_path(files.key_file)
    bare.cert_chain_pems[0].write_to_path(files.cert_file)
    assert not tls.check() and tls.peers.domain == "gw.example.internal"


def test_the_compose_scraper_is_the_identity_allowed_on_metrics() -> None:
    """pki-init issues Prometheus the certificate the services let GET /metrics."""
    assert compose_init.SCRAPER == inner_tls.METRICS_SCRAPER


# ------------------------------------------------------------------ ext_authz's HTTP front


@pytest.fixture
async def authz_front(pki: Pki) -> AsyncIterator[HttpService]:
    own = pki.files("ext-authz", f"ext-authz.{DOMAIN}", "127.0.0.1")
    service = await HttpService.open(
        GrpcSettings("ext_authz", "x", Instance("127.0.0.1", 0), tls=own), max_body=4096)
    try:
        await service.set_serving()
        yield service
    finally:
        await service.close()


async def _get(port: int, path: str, client: ssl.SSLContext, *,
               method: str = "GET") -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.request(method, f"https://127.0.0.1:{port}{path}", ssl=client,
                                data=b"{}" if method == "POST" else None) as reply:
            body = await reply.json() if reply.content_type == "application/json" else None
            return reply.status, body


async def test_ext_authz_http_front_accepts_envoy_only(
        pki: Pki, authz_front: HttpService, caplog: pytest.LogCaptureFixture) -> None:
    """Envoy's certificate reaches /check and health; the aggregator's, ext_authz's own, or one
    without a DNS name from the same CA get 403 peer_not_allowed, logged naming the peer."""
    port = authz_front.port
    status, _ = await _get(port, HEALTH_PATH, _client(pki.identity(inner_tls.ENVOY)))
    assert status == 200
    # No decision core registered: /check answers 503, past the peer check.
    status, _ = await _get(port, "/check/mcp/files", _client(pki.identity(inner_tls.ENVOY)),
                           method="POST")
    assert status == 503
    for files in (pki.identity(inner_tls.AGGREGATOR), pki.identity(inner_tls.EXT_AUTHZ),
                  pki.files("no-dns", "127.0.0.1")):
        for path, method in (("/check/mcp/files", "POST"), (HEALTH_PATH, "GET")):
            with caplog.at_level(logging.WARNING, logger="gateway.inner_peers"):
                status, body = await _get(port, path, _client(files), method=method)
            assert status == 403, (files.cert_file, path)
            assert body["error"]["code"] == FORBIDDEN
            assert body["error"]["data"]["reason"] == inner_tls.PEER_NOT_ALLOWED
    peers = {r.peer for r in caplog.records if getattr(r, "reason", "") == "peer_not_allowed"}  # type: ignore[attr-defined]
    assert {f"aggregator.{DOMAIN}", f"ext-authz.{DOMAIN}", ""} <= peers


# ------------------------------------------------------------------------- a gRPC service


@pytest.fixture
async def grpc_service(pki: Pki) -> AsyncIterator[GrpcService]:
    own = pki.files("ext-proc", f"ext-proc.{DOMAIN}", "127.0.0.1")
    service = await GrpcService.open(GrpcSettings("ext_proc", "x", Instance("127.0.0.1", 0),
                                                  tls=own))
    try:
        await service.start()
        await service.set_serving()
        yield service
    finally:
        await service.stop(grace=None)


def _channel(port: int, client: TlsFiles) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(Path(client.ca_file).read_bytes(),
                                         Path(client.key_file).read_bytes(),
                                         Path(client.cert_file).read_bytes())
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                   options=[("grpc.ssl_target_name_override", f"ext-proc.{DOMAIN}")])


async def _health(port: int, client: TlsFiles) -> tuple[int, int]:
    """The unary Check's status and the first status of the streaming Watch."""
    async with _channel(port, client) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # generated stub: untyped methods
        check = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_SECONDS)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_SECONDS)
        first = await watch.read()
        watch.cancel()
        return check.status, first.status


async def test_grpc_service_accepts_envoy_only(pki: Pki, grpc_service: GrpcService) -> None:
    """Unary and streaming calls work with Envoy's certificate; the aggregator's or ext_authz's
    from the same CA are refused PERMISSION_DENIED naming peer_not_allowed."""
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await _health(grpc_service.port, pki.identity(inner_tls.ENVOY)) == (serving, serving)
    for identity in (inner_tls.AGGREGATOR, inner_tls.EXT_AUTHZ):
        async with _channel(grpc_service.port, pki.identity(identity)) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_SECONDS)
            assert unary.value.code() == grpc.StatusCode.PERMISSION_DENIED, identity
            assert inner_tls.PEER_NOT_ALLOWED in (unary.value.details() or "")
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_SECONDS)
            with pytest.raises(grpc.aio.AioRpcError) as streaming:
                await watch.read()
            assert streaming.value.code() == grpc.StatusCode.PERMISSION_DENIED, identity


# ------------------------------------------------------------------------- an MCP server


@pytest.fixture
def mcp_server(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Pki]]:
    own = pki.files("server", f"server-files.{DOMAIN}", "127.0.0.1")
    for name, value in own.env().items():
        monkeypatch.setenv(name, value)
    yield free_port(offsets=(0,)), pki


async def test_mcp_server_accepts_envoy_and_ext_authz(mcp_server: tuple[int, Pki]) -> None:
    """A server (run_server, as its process runs it) answers Envoy's and ext_authz's
    certificates, refuses the aggregator's and ext_proc's with 403 peer_not_allowed, and lets
    Prometheus's GET /metrics only."""
    port, pki = mcp_server
    settings = ServerSettings(host="127.0.0.1", port=port, allowed_hosts=("*",))
    stop = asyncio.Event()
    task = asyncio.create_task(run_server(MCPServer("files"), settings, stop))
    envoy = _client(pki.identity(inner_tls.ENVOY))
    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            while True:
                try:
                    if (await _get(port, "/health", envoy))[0] == 200:
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)  # polling the port until it listens, bounded
        for identity in (inner_tls.ENVOY, inner_tls.EXT_AUTHZ):
            status, _ = await _get(port, "/mcp", _client(pki.identity(identity)), method="POST")
            assert status not in (401, 403), identity  # past the peer check (a bad request)
        for identity in (inner_tls.AGGREGATOR, inner_tls.EXT_PROC):
            for path, method in (("/mcp", "POST"), ("/health", "GET"), ("/metrics", "GET")):
                status, body = await _get(port, path, _client(pki.identity(identity)), method=method)
                assert status == 403 and body["error"]["data"]["reason"] == "peer_not_allowed"
        scraper = _client(pki.identity(inner_tls.METRICS_SCRAPER))
        assert (await _get(port, "/metrics", scraper))[0] == 200
        assert (await _get(port, "/health", scraper))[0] == 403
        assert (await _get(port, "/mcp", scraper, method="POST"))[0] == 403
    finally:
        stop.set()
        async with asyncio.timeout(DEADLINE_SECONDS):
            await task


# ------------------------------------------------------------------------- on uvloop


def test_the_peer_checks_hold_on_uvloop(pki: Pki, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """The same three checks on uvloop, the loop the service processes run on
    (gateway.eventloop): its TLS transports cannot be weakly referenced, so the per-connection
    verdict must not be keyed on them (it was: every request answered 500)."""
    own = pki.files("server", f"server-files.{DOMAIN}", "127.0.0.1")
    for name, value in own.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    assert eventloop.choice() == "uvloop"

    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        authz = await HttpService.open(GrpcSettings(
            "ext_authz", "x", Instance("127.0.0.1", 0),
            tls=pki.files("ext-authz", f"ext-authz.{DOMAIN}", "127.0.0.1")), max_body=4096)
        try:
            await authz.set_serving()
            await test_ext_authz_http_front_accepts_envoy_only(pki, authz, caplog)
        finally:
            await authz.close()
        grpc_service = await GrpcService.open(GrpcSettings(
            "ext_proc", "x", Instance("127.0.0.1", 0),
            tls=pki.files("ext-proc", f"ext-proc.{DOMAIN}", "127.0.0.1")))
        try:
            await grpc_service.start()
            await grpc_service.set_serving()
            await test_grpc_service_accepts_envoy_only(pki, grpc_service)
        finally:
            await grpc_service.stop(grace=None)
        await test_mcp_server_accepts_envoy_and_ext_authz((free_port(offsets=(0,)), pki))

    eventloop.run(main())
