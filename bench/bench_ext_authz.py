"""ext_authz benchmark (not a test): Python CPU per allowed tools/call decision and latency.

    .venv/bin/python bench/bench_ext_authz.py [--requests N] [--concurrency 16]

1. In-process: CPU (time.process_time) per ``Check`` of an allowed ``tools/call`` with a cached
   token and the real embedded Rego policy from ``policies/``, split into stages.
2. Over the wire, once per transport: ``python -m ext_authz`` in a subprocess, 16 concurrent
   in-flight checks, from a grpc.aio client (``transport: grpc``) or an aiohttp client posting
   Envoy's HTTP-mode request (``transport: http``, the default); the server's CPU per request
   (from /proc) and client-side p50/p99.
   Its tool catalog is fetched from a real MCP server (``mcp_servers.core``, in this process)
   serving ``read_file``: without a loaded catalog every tools/call is refused (fail closed).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import yaml
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ext_authz.catalog import CatalogGate  # noqa: E402
from ext_authz.jwks import JwksClient  # noqa: E402
from ext_authz.jwt import TokenVerifier  # noqa: E402
from ext_authz.ratelimit import MemoryRateLimiter  # noqa: E402
from ext_authz.request import http_request, policy_input  # noqa: E402
from ext_authz.servicer import AuthorizationServicer  # noqa: E402
from ext_authz.settings import Settings  # noqa: E402
from gateway.caller import Caller  # noqa: E402
from gateway.catalog import Catalog  # noqa: E402
from gateway.config import GatewayConfig, parse_config  # noqa: E402
from gateway.jsonrpc import parse_message  # noqa: E402
from gateway.mcp import extract_context  # noqa: E402
from gateway.policy import Decision  # noqa: E402
from gateway.policy.factory import build_engine  # noqa: E402
from gateway.telemetry import AuditWriter  # noqa: E402
from gatewayctl.tokens import SigningKey, generate_key, mint_token  # noqa: E402
from mcp_servers.core import MCPServer, ToolContext  # noqa: E402
from mcp_servers.core.app import make_app  # noqa: E402

ISSUER = "https://bench-issuer.example"
PUBLIC_URL = "https://gw.example.test"
BODY = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
    "name": "read_file", "arguments": {"path": "shared/reports/q3.txt"}}})


READ_FILE_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"path": {"type": "string"}},
                                    "required": ["path"], "additionalProperties": False}


TRANSPORTS = ("http", "grpc")
TRANSPORT_LABELS = {"http": "Envoy's HTTP mode", "grpc": "gRPC"}


def raw_config(jwks_url: str, state: Path, files_port: int = 9201) -> dict[str, Any]:
    return {
        "public_url": PUBLIC_URL,
        # Audit and catalog in a private folder: never the dev stack's .run/.
        "state_dir": str(state),
        "audit": {"dir": str(state / "audit")},
        "catalog": {"path": str(state / "catalog.sqlite")},
        "tls": {"cert_file": "server.pem", "key_file": "server.key"},
        "issuers": [{"issuer": ISSUER, "jwks_url": jwks_url}],
        "policy": {"dir": str(ROOT / "policies")},
        # Realistic: a per-user bucket is consulted, but high enough never to refuse.
        "rate_limits": {"per_user": {"rate_per_second": 1e9, "burst": 10**9}},
        "ext_authz": {"instances": [{"port": 9101}]},
        "ext_proc": {"instances": [{"port": 9111}]},
        "servers": {"files": {"module": "m", "instances": [{"port": files_port}]}},
    }


def check_request(token: str) -> pb.CheckRequest:
    req = pb.CheckRequest()
    sock = req.attributes.source.address.socket_address
    sock.address, sock.port_value = "10.0.0.7", 51234
    http = req.attributes.request.http
    http.id, http.method, http.path = "1234567890", "POST", "/mcp/files"
    http.host, http.scheme, http.protocol = "gw.example.test", "https", "HTTP/2"
    http.headers.update({
        ":method": "POST", ":path": "/mcp/files", ":authority": "gw.example.test",
        ":scheme": "https", "content-type": "application/json",
        "accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25",
        "mcp-session-id": "3f1c2d9e8b7a4c56", "user-agent": "claude-code/2.1",
        "x-request-id": "673e035f-618a-4067-b8fc-d852dcbabfb1", "x-forwarded-proto": "https",
        "content-length": str(len(BODY)), "x-envoy-auth-partial-body": "false",
        "authorization": f"Bearer {token}",
    })
    http.raw_body = BODY
    http.size = len(BODY)
    return req


async def files_server() -> tuple[web.AppRunner, int]:
    """A real MCP server listing ``read_file``: what ext_authz loads its tool catalog from."""
    server = MCPServer("files", version="1.0.0")

    @server.tool(name="read_file", description="Read a file", input_schema=READ_FILE_SCHEMA)
    async def read_file(ctx: ToolContext, arguments: dict[str, Any]) -> str:
        return ""

    runner = web.AppRunner(make_app(server), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def jwks_app(key: SigningKey) -> tuple[web.AppRunner, str]:
    app = web.Application()

    async def handle(_: web.Request) -> web.Response:
        return web.json_response(key.jwks())

    app.router.add_get("/jwks.json", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/jwks.json"


class _ConstantAllow:
    """Isolates ext_authz's own cost from the policy's (same obligations as the real policy)."""

    revision = None

    async def decide(self, policy_input: dict[str, Any]) -> Decision:
        return Decision(True, "method_allowed", 200, {}, {"mask_pii": ["email", "phone"]})


def per_call_us(total_cpu: float, n: int) -> float:
    return total_cpu / n * 1e6


async def in_process(cfg: GatewayConfig, token: str, n: int) -> dict[str, float]:
    settings = Settings.from_config(cfg, port=0)
    engine = build_engine(cfg.policy)
    await engine.start()
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        issuer = cfg.issuers[0]
        jwks = JwksClient(issuer.jwks_url, session, cooldown=30, timeout=5, max_bytes=1 << 18)
        verifier = TokenVerifier({ISSUER: (issuer, jwks)}, cfg.auth)
        servicer = AuthorizationServicer(settings, verifier, MemoryRateLimiter(), engine)
        wire = check_request(token).SerializeToString()
        first = await servicer.Check(pb.CheckRequest.FromString(wire), None)
        if not first.HasField("ok_response"):
            raise SystemExit(f"the benchmark request is not allowed by the policy: {first}")
        resource = settings.resource_url("files")

        t = time.process_time()
        for _ in range(n):
            resp = await servicer.Check(pb.CheckRequest.FromString(wire), None)
            resp.SerializeToString()
        out["full Check (decode + decide + encode)"] = per_call_us(time.process_time() - t, n)

        trivial = AuthorizationServicer(settings, verifier, MemoryRateLimiter(), _ConstantAllow())
        t = time.process_time()
        for _ in range(n):
            resp = await trivial.Check(pb.CheckRequest.FromString(wire), None)
            resp.SerializeToString()
        out["full Check, constant-allow engine (ext_authz's own cost)"] = \
            per_call_us(time.process_time() - t, n)

        catalog = Catalog(settings.catalog.path)
        catalog.refresh("files", [{"name": "read_file", "description": "Read a file",
                                   "inputSchema": READ_FILE_SCHEMA}])
        gate = CatalogGate(catalog, ["files"], refresh_seconds=60)
        with_catalog = AuthorizationServicer(settings, verifier, MemoryRateLimiter(),
                                             _ConstantAllow(), catalog=gate)
        await with_catalog.Check(pb.CheckRequest.FromString(wire), None)
        t = time.process_time()
        for _ in range(n):
            resp = await with_catalog.Check(pb.CheckRequest.FromString(wire), None)
            resp.SerializeToString()
        out["full Check, constant-allow + catalog/argument check"] = \
            per_call_us(time.process_time() - t, n)
        async with AuditWriter(Path(settings.audit.dir) / "bench.jsonl") as audit:
            with_audit = AuthorizationServicer(settings, verifier, MemoryRateLimiter(),
                                               _ConstantAllow(), catalog=gate, audit=audit)
            t = time.process_time()
            for _ in range(n):
                resp = await with_audit.Check(pb.CheckRequest.FromString(wire), None)
                resp.SerializeToString()
            out["full Check, constant-allow + catalog + audit entry (one fsync each)"] = \
                per_call_us(time.process_time() - t, n)

            # As under load: checks in flight together share their fsyncs (group commit).
            async def worker(calls: int) -> None:
                for _ in range(calls):
                    resp = await with_audit.Check(pb.CheckRequest.FromString(wire), None)
                    resp.SerializeToString()

            workers = 16
            t = time.process_time()
            await asyncio.gather(*(worker(n // workers) for _ in range(workers)))
            out[f"full Check, constant-allow + catalog + audit entry ({workers} concurrent)"] = \
                per_call_us(time.process_time() - t, n // workers * workers)

        msg = pb.CheckRequest.FromString(wire)
        t = time.process_time()
        for _ in range(n):
            pb.CheckRequest.FromString(wire)
        out["CheckRequest decode"] = per_call_us(time.process_time() - t, n)
        t = time.process_time()
        for _ in range(n):
            req = http_request(msg)
        out["request view (headers, body)"] = per_call_us(time.process_time() - t, n)
        t = time.process_time()
        for _ in range(n):
            await verifier.verify(token, resource)
        out["token (cached)"] = per_call_us(time.process_time() - t, n)
        t = time.process_time()
        for _ in range(n):
            parsed = parse_message(req.body)
            ctx = extract_context(parsed, req.headers)
        out["JSON-RPC parse + MCP context"] = per_call_us(time.process_time() - t, n)
        claims = await verifier.verify(token, resource)
        doc = policy_input(req, parsed_body=parsed.raw, mcp=ctx, caller=Caller.from_claims(claims),
                           server="files",
                           resource=resource, now=time.time())
        t = time.process_time()
        for _ in range(n):
            await engine.decide(doc)
        out["policy decide (embedded Rego)"] = per_call_us(time.process_time() - t, n)
    await engine.close()
    return out


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_check_headers(token: str) -> dict[str, str]:
    """What Envoy's HTTP mode sends for ``check_request``: no pseudo headers, the client address
    in x-mcp-peer-address."""
    headers = {k: v for k, v in check_request(token).attributes.request.http.headers.items()
               if not k.startswith(":") and k != "content-length"}
    return {**headers, "host": "gw.example.test", "x-mcp-peer-address": "10.0.0.7"}


async def over_the_wire(config_path: Path, token: str, n: int, concurrency: int,
                        transport: str) -> tuple[float, float, float, float]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ext_authz", "--config", str(config_path), "--port", str(port),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if transport == "http":
            return await _over_http(proc.pid, port, token, n, concurrency)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True)
            stub = pb_grpc.AuthorizationStub(channel)
            req = check_request(token)
            for _ in range(200):  # warm-up: caches, policy, connection
                await stub.Check(req, timeout=5)
            latencies: list[float] = []
            per_worker = n // concurrency

            async def worker() -> None:
                for _ in range(per_worker):
                    t0 = time.perf_counter()
                    resp = await stub.Check(req, timeout=5)
                    latencies.append(time.perf_counter() - t0)
                    if not resp.HasField("ok_response"):
                        raise RuntimeError("denied during the benchmark")

            cpu0 = proc_cpu_seconds(proc.pid)
            wall0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - wall0
            cpu = proc_cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
    return _summary(latencies, cpu, wall)


def _summary(latencies: list[float], cpu: float, wall: float) -> tuple[float, float, float, float]:
    done = len(latencies)
    qs = statistics.quantiles(latencies, n=100)
    return cpu / done * 1e6, qs[49] * 1e3, qs[98] * 1e3, done / wall


async def _over_http(pid: int, port: int, token: str, n: int, concurrency: int
                     ) -> tuple[float, float, float, float]:
    base = f"http://127.0.0.1:{port}"
    headers = http_check_headers(token)
    # One connection per in-flight check, as Envoy's HTTP/1.1 pool holds them.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with session.get(f"{base}/-/health") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ext_authz (http) did not become healthy within 60 s")
            await asyncio.sleep(0.1)
        url = f"{base}/check/mcp/files"

        async def one() -> None:
            async with session.post(url, data=BODY, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"denied during the benchmark ({resp.status})")

        for _ in range(200):  # warm-up: caches, policy, connections
            await one()
        latencies: list[float] = []
        per_worker = n // concurrency

        async def worker() -> None:
            for _ in range(per_worker):
                t0 = time.perf_counter()
                await one()
                latencies.append(time.perf_counter() - t0)

        cpu0 = proc_cpu_seconds(pid)
        wall0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - wall0
        cpu = proc_cpu_seconds(pid) - cpu0
    return _summary(latencies, cpu, wall)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    key = generate_key("RSA")
    runner, jwks_url = await jwks_app(key)
    files_runner, files_port = await files_server()
    state = tempfile.TemporaryDirectory(prefix="bench-ext-authz-")
    try:
        raw = raw_config(jwks_url, Path(state.name), files_port)
        cfg = parse_config(raw, base_dir=ROOT)
        token = mint_token(key, issuer=ISSUER, audience=f"{PUBLIC_URL}/mcp/files", sub="alice",
                           roles=["engineer"], scopes=["tools:call:files/read_file"],
                           tenant="acme", ttl=3600)
        stages = await in_process(cfg, token, args.requests)
        wire: dict[str, tuple[float, float, float, float]] = {}
        for transport in TRANSPORTS:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "gateway.yaml"
                path.write_text(yaml.safe_dump(
                    {**raw, "ext_authz": {**raw["ext_authz"], "transport": transport}}))
                wire[transport] = await over_the_wire(path, token, args.requests,
                                                      args.concurrency, transport)
    finally:
        await files_runner.cleanup()
        await runner.cleanup()
        state.cleanup()
    print(f"## ext_authz: allowed tools/call, cached RS256 token, embedded Rego policy "
          f"({args.requests} requests)\n")
    print("| measure | value |")
    print("|---|---|")
    for name, us in stages.items():
        print(f"| in-process CPU: {name} | {us:.1f} us |")
    for transport, (cpu_us, p50, p99, rps) in wire.items():
        label = TRANSPORT_LABELS[transport]
        print(f"| server CPU per request over {label} ({args.concurrency} concurrent) | "
              f"{cpu_us:.0f} us |")
        print(f"| latency p50 / p99 over {label} ({args.concurrency} concurrent) | "
              f"{p50:.2f} ms / {p99:.2f} ms |")
        print(f"| throughput over {label} (one ext_authz process) | {rps:.0f} req/s |")


if __name__ == "__main__":
    asyncio.run(main())
