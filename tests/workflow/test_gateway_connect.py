"""--gateway-connect: the steps reach the gateway at another address, while the request, the TLS
server name and the certificate check keep the gateway's public host name."""

from __future__ import annotations

import argparse
import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mcp_servers.workflow.client import UNAVAILABLE, GatewayClient, StepError, parse_connect
from mcp_servers.workflow.server import add_arguments, build_server

REPO = Path(__file__).resolve().parents[2]
PUBLIC = "gateway.test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Pki:
    ca_file: Path
    folder: Path

    def leaf(self, dns: str) -> tuple[Path, Path]:
        ca_key = serialization.load_pem_private_key((self.folder / "ca.key").read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(dns)).issuer_name(_name("test ca"))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_file, key_file = self.folder / f"{dns}.pem", self.folder / f"{dns}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file


def make_pki(folder: Path) -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("test ca")).issuer_name(_name("test ca"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Pki(folder / "ca.pem", folder)


@dataclass
class Seen:
    port: int
    hosts: list[str] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)


@asynccontextmanager
async def tls_gateway(cert: Path, key: Path) -> AsyncIterator[Seen]:
    """A gateway stand-in on 127.0.0.1 over TLS with ``cert``: answers each tools/call with the
    Host header it received."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    seen: list[Seen] = []

    def sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen[0].server_names.append(name)

    ctx.sni_callback = sni

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        seen[0].hosts.append(request.host)
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {
            "content": [{"type": "text", "text": "ok"}],
            "structuredContent": {"host": request.host, "path": request.path}}})

    app = web.Application()
    app.router.add_post("/mcp/{server}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    seen.append(Seen(runner.addresses[0][1]))
    try:
        yield seen[0]
    finally:
        await runner.cleanup()


def client_ctx(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def test_steps_connect_elsewhere_but_name_the_public_host(tmp_path: Path) -> None:
    """With a connect address the call reaches 127.0.0.1, as Host and TLS server name of the public URL."""
    pki = make_pki(tmp_path)
    async with tls_gateway(*pki.leaf(PUBLIC)) as seen:
        client = GatewayClient(f"https://{PUBLIC}", client_ctx(pki.ca_file), ("127.0.0.1", seen.port))
        await client.open()
        try:
            outcome = await client.call("files", "read", {}, "token", timeout_seconds=5)
        finally:
            await client.close()
    assert outcome.output == {"host": PUBLIC, "path": "/mcp/files"}
    assert seen.server_names == [PUBLIC]


async def test_connect_by_host_name_resolves_that_name(tmp_path: Path) -> None:
    """A connect host name (compose: a service name) is resolved in place of the public one."""
    pki = make_pki(tmp_path)
    async with tls_gateway(*pki.leaf(PUBLIC)) as seen:
        client = GatewayClient(f"https://{PUBLIC}/", client_ctx(pki.ca_file), ("localhost", seen.port))
        await client.open()
        try:
            outcome = await client.call("database", "query", {}, "token", timeout_seconds=5)
        finally:
            await client.close()
    assert outcome.output["host"] == PUBLIC


async def test_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    """The certificate is checked against the public name: one for another name fails the step, unsent."""
    pki = make_pki(tmp_path)
    async with tls_gateway(*pki.leaf("other.test")) as seen:
        client = GatewayClient(f"https://{PUBLIC}", client_ctx(pki.ca_file), ("127.0.0.1", seen.port))
        await client.open()
        try:
            with pytest.raises(StepError) as err:
                await client.call("files", "read", {}, "token", timeout_seconds=5)
        finally:
            await client.close()
    assert err.value.reason == UNAVAILABLE and not err.value.outcome_unknown
    assert seen.hosts == []


async def test_certificate_of_an_unknown_ca_is_refused(tmp_path: Path) -> None:
    """A certificate for the public name from a CA the server does not trust fails the step."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trusted, other = make_pki(tmp_path / "a"), make_pki(tmp_path / "b")
    async with tls_gateway(*other.leaf(PUBLIC)) as seen:
        client = GatewayClient(f"https://{PUBLIC}", client_ctx(trusted.ca_file), ("127.0.0.1", seen.port))
        await client.open()
        try:
            with pytest.raises(StepError) as err:
                await client.call("files", "read", {}, "token", timeout_seconds=5)
        finally:
            await client.close()
    assert err.value.reason == UNAVAILABLE
    assert seen.hosts == []


@pytest.mark.parametrize(("text", "expected"), [
    ("envoy:8443", ("envoy", 8443)),
    ("https://envoy:8443", ("envoy", 8443)),
    ("https://envoy", ("envoy", 443)),
    ("https://envoy:8443/", ("envoy", 8443)),
    ("127.0.0.1:9", ("127.0.0.1", 9)),
    ("[::1]:8443", ("::1", 8443)),
])
def test_connect_values_accepted(text: str, expected: tuple[str, int]) -> None:
    """host:port and https://host[:port] give the host and port (443 by default for https)."""
    assert parse_connect(text) == expected


@pytest.mark.parametrize("text", ["envoy", "http://envoy:8443", "https://envoy:8443/mcp",
                                  "https://u:p@envoy:8443", "envoy:0", "envoy:70000", ":8443",
                                  "envoy:port", "", "en voy:1", "https://envoy:99999",
                                  "https://envoy:8443?x=1", "x" * 400 + ":1"])
def test_bad_connect_values_refused_at_start(tmp_path: Path, text: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --gateway-connect stops the start with an error naming the flag."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--runs-db", str(tmp_path / "r.db"), "--delegation-key", str(tmp_path / "k"),
                           "--delegation-issuer", "urn:wf", "--gateway-connect", text])
    assert "--gateway-connect" in capsys.readouterr().err


def test_connect_needs_a_host_name_in_the_public_url(tmp_path: Path) -> None:
    """A public URL with an IP address cannot be re-pointed (no name to resolve): refused at start."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--assertion-jwks")
    parser.add_argument("--assertion-issuer")
    add_arguments(parser)
    args = parser.parse_args(["--workflows", str(REPO / "workflows"), "--runs-db", str(tmp_path / "r.db"),
                              "--delegation-key", str(tmp_path / "k.json"), "--delegation-issuer", "urn:wf",
                              "--assertion-jwks", "j", "--assertion-issuer", "https://10.0.0.1",
                              "--gateway-connect", "envoy:8443"])
    with pytest.raises(SystemExit, match="--gateway-connect"):
        build_server(args)


async def test_resolver_refuses_any_other_host(tmp_path: Path) -> None:
    """Only the public host is re-pointed: a request to any other name does not connect."""
    client = GatewayClient(f"https://{PUBLIC}", client_ctx(make_pki(tmp_path).ca_file), ("127.0.0.1", 9))
    await client.open()
    try:
        assert client._resolver is not None  # noqa: SLF001
        with pytest.raises(OSError, match="not the gateway's public host"):
            await client._resolver.resolve("elsewhere.test", 443)  # noqa: SLF001
    finally:
        await client.close()
