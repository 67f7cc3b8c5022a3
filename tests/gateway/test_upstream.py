"""Reaching a `url` server the way its config says, against a server written with the official
Python SDK: over HTTP at a path of its own, and over HTTPS with a client certificate required."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from gateway.catalog.client import fetch_listing
from gateway.config import DEFAULT_CONFIG_PATH, ServerConfig, parse_config
from gateway.upstream import ProbeFailed, UpstreamError, probe, resolve_headers, targets
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
START_SECONDS = 20.0


@dataclass
class SdkServer:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


def _start(port: int, log: Path, *extra: str) -> SdkServer:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.servers.sdk_http_server", "--port", str(port),
             *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out)
    return SdkServer(port, proc, log)


async def _wait_listening(server: SdkServer) -> None:
    deadline = asyncio.get_running_loop().time() + START_SECONDS
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the SDK server exited: {server.log.read_text(errors='replace')}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()  # before any await, so nothing can leave the connection open
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def _stop(server: SdkServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("mcp.internal.test", "127.0.0.1")
    client = ca.issue_cert("gateway-client")
    other = trustme.CA()
    files = {"ca": folder / "ca.pem", "other_ca": folder / "other.pem", "cert": folder / "srv.pem",
             "key": folder / "srv.key", "client_cert": folder / "cli.pem", "client_key": folder / "cli.key"}
    ca.cert_pem.write_to_path(files["ca"])
    other.cert_pem.write_to_path(files["other_ca"])
    server.cert_chain_pems[0].write_to_path(files["cert"])
    server.private_key_pem.write_to_path(files["key"])
    client.cert_chain_pems[0].write_to_path(files["client_cert"])
    client.private_key_pem.write_to_path(files["client_key"])
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def servers(pki: dict[str, str], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[SdkServer, SdkServer]]:
    logs = tmp_path_factory.mktemp("sdk-logs")
    plain = _start(free_port(), logs / "plain.log", "--path", "/v1/mcp")
    tls = _start(free_port(), logs / "tls.log", "--tls-cert", pki["cert"], "--tls-key", pki["key"],
                 "--client-ca", pki["ca"])
    try:
        yield plain, tls
    finally:
        _stop(plain)
        _stop(tls)


def _open_connections_to(ports: set[int]) -> int:
    """This process's TCP sockets whose remote end is one of ``ports`` (from /proc)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) in ports:
                    count += 1
    return count


@pytest.fixture
async def http(servers: tuple[SdkServer, SdkServer]) -> AsyncIterator[aiohttp.ClientSession]:
    for server in servers:
        await _wait_listening(server)
    async with aiohttp.ClientSession() as session:
        yield session
    # A connection aiohttp closed on an error answer ends with an asynchronous TLS shutdown the
    # session does not wait for; let it finish on this test's loop, so no transport outlives it.
    ports = {server.port for server in servers}
    deadline = asyncio.get_running_loop().time() + 40  # > asyncio's 30 s TLS shutdown bound
    while _open_connections_to(ports):
        assert asyncio.get_running_loop().time() < deadline, "a connection to a server stays open"
        await asyncio.sleep(0.05)


def _server(entry: dict[str, Any], secrets: tuple[str, ...] = ()) -> ServerConfig:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["servers"] = {"sdk": entry}
    raw["secrets"] = [*raw.get("secrets", []), *secrets]
    return parse_config(raw, base_dir=ROOT).server("sdk")


def _tls_entry(pki: dict[str, str], port: int, **tls: str) -> dict[str, Any]:
    return {"url": f"https://127.0.0.1:{port}/mcp",
            "tls": {"ca_file": pki["ca"], "client_cert_file": pki["client_cert"],
                    "client_key_file": pki["client_key"], **tls}}


async def test_plain_http_server_at_its_own_path(http: aiohttp.ClientSession,
                                                 servers: tuple[SdkServer, SdkServer]) -> None:
    """The MCP handshake probe and the catalog fetch reach the SDK server at /v1/mcp."""
    target, = targets(_server({"url": f"http://127.0.0.1:{servers[0].port}/v1/mcp"}), {})
    await probe(http, target, "handshake")
    await probe(http, target, "tcp")
    listing = await fetch_listing(http, target, headers={})
    assert {t["name"] for t in listing.tools} >= {"add", "lookup_customer", "slow", "whoami"}


async def test_probe_names_what_the_server_answered(http: aiohttp.ClientSession,
                                                    servers: tuple[SdkServer, SdkServer]) -> None:
    """A wrong path, a closed port and an HTTP check of a missing page each fail with a reason."""
    wrong, = targets(_server({"url": f"http://127.0.0.1:{servers[0].port}/mcp"}), {})
    with pytest.raises(ProbeFailed, match="initialize answered HTTP 404"):
        await probe(http, wrong, "handshake")
    with pytest.raises(ProbeFailed, match="HTTP 404"):
        await probe(http, wrong, "http", health_path="/nope")
    closed, = targets(_server({"url": f"http://127.0.0.1:{free_port()}/mcp"}), {})
    for kind in ("handshake", "tcp"):
        with pytest.raises(ProbeFailed):
            await probe(http, closed, kind)


async def test_https_with_a_client_certificate(http: aiohttp.ClientSession, pki: dict[str, str],
                                               servers: tuple[SdkServer, SdkServer]) -> None:
    """With the CA and the client certificate the TLS server answers the handshake and lists."""
    target, = targets(_server(_tls_entry(pki, servers[1].port)), {})
    await probe(http, target, "handshake")
    listing = await fetch_listing(http, target, headers={})
    assert "add" in {t["name"] for t in listing.tools}


@pytest.mark.parametrize("change", ["other_ca", "no_client_cert", "wrong_name"])
async def test_https_refuses_what_does_not_verify(http: aiohttp.ClientSession, pki: dict[str, str],
                                                  servers: tuple[SdkServer, SdkServer],
                                                  change: str) -> None:
    """Another CA, no client certificate, or a certificate name that is not the expected one:
    no answer is trusted."""
    entry = _tls_entry(pki, servers[1].port)
    if change == "other_ca":
        entry["tls"]["ca_file"] = pki["other_ca"]
    elif change == "no_client_cert":
        entry["tls"] = {"ca_file": pki["ca"]}
    else:
        entry["tls"]["server_name"] = "someone-else.test"
    target, = targets(_server(entry), {})
    with pytest.raises(ProbeFailed):
        await probe(http, target, "handshake")


async def test_server_name_is_checked_and_sent(http: aiohttp.ClientSession, pki: dict[str, str],
                                               servers: tuple[SdkServer, SdkServer]) -> None:
    """server_name replaces the URL's host for verification (a certificate for a DNS name reached
    by address)."""
    target, = targets(_server(_tls_entry(pki, servers[1].port, server_name="mcp.internal.test")), {})
    await probe(http, target, "tcp")
    # The SDK server checks Host against its own allow-list; the handshake still verifies TLS.
    with pytest.raises(ProbeFailed, match="HTTP 421|initialize"):
        await probe(http, targets(_server({**_tls_entry(pki, servers[1].port,
                                                        server_name="mcp.internal.test"),
                                           "host_header": "mcp.internal.test"}), {})[0],
                    "handshake")


def test_static_headers_take_secrets_from_the_environment() -> None:
    """${NAME} is replaced by the secret; an unset one is an error naming server and header."""
    server = _server({"url": "http://127.0.0.1:1/mcp",
                      "headers": {"authorization": "Bearer ${SDK_KEY}", "x-team": "blue"}},
                     secrets=("SDK_KEY",))
    assert resolve_headers(server, {"SDK_KEY": "s3cret"}) == \
        {"authorization": "Bearer s3cret", "x-team": "blue"}
    with pytest.raises(UpstreamError, match=r"servers\.sdk\.headers\.authorization: the secret SDK_KEY"):
        resolve_headers(server, {})
    with pytest.raises(UpstreamError, match="one-line"):
        resolve_headers(server, {"SDK_KEY": "a\r\nx-evil: 1"})
    assert "s3cret" not in repr(server) and os.environ.get("SDK_KEY") is None
