"""ext_authz transport benchmark (not a test): what the authorization server's process costs per
request over each transport Envoy offers, with the policy work taken out.

    .venv/bin/python bench/bench_transport.py [--seconds 4] [--connections 16] [--rounds 3]

Each mode gets its own Envoy (``--concurrency 1``, plain HTTP on loopback, a ``direct_response``
route as the upstream) and its own authorization server process; only the ext_authz filter's
transport differs between the Envoys:

- ``grpc-aio``: ``grpc_service`` to a ``grpc.aio`` server (xds-protos stubs, as ext_authz runs);
- ``grpc-sync``: the same servicer on a sync ``grpc.server`` with a ThreadPoolExecutor;
- ``http-aiohttp``: ``http_service`` to an aiohttp app; upstream headers through
  ``allowed_upstream_headers``, metadata through ``dynamic_metadata_from_headers``.

Every server does the same trivial work per request (reads the token and the ~1 KB body, answers
allow with 3 upstream headers and 3 dynamic metadata entries) so the difference is the transport.
wrk posts the same JSON-RPC body with fixed connections; after a warm-up the modes are measured
in turn, ``--rounds`` times, and each mode's best round (lowest authz CPU per request) is
reported. CPU per request is utime+stime from /proc/<pid>/stat of the process (all its threads)
over the measured window divided by the 2xx answers. Before measuring, a probe checks that the
headers reached the request and the metadata reached Envoy (the route echoes both back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.procs import Child, ProcessSet, cpu_seconds, free_port, wait_until  # noqa: E402
from gateway.signals import stop_event  # noqa: E402

MODES = ("grpc-aio", "grpc-sync", "http-aiohttp")
START_TIMEOUT = 30.0
SYNC_WORKERS = 4
# What the authorization server hands Envoy on allow: the same names in every mode, so the
# Envoy route that echoes them back is identical.
UPSTREAM_HEADERS = {"x-authz-user": "bench-user", "x-authz-roles": "engineer",
                    "x-authz-decision-id": "5b0f6f2e-6c3e-4a0e-9d1c-2f1e7c9b8a01"}
METADATA = {"x-md-user": "bench-user", "x-md-decision": "method_allowed",
            "x-md-mask-pii": "email,phone"}
TOKEN = "eyJhbGciOiJSUzI1NiJ9." + "A" * 600 + "." + "B" * 340  # a JWT-sized bearer
BODY = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
    "name": "echo", "arguments": {"text": "x" * 880}}}, separators=(",", ":"))
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
H2_OPTIONS = """\
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"""
GRPC_SERVICE = """\
              grpc_service:
                envoy_grpc: {cluster_name: authz}
                timeout: 2s
              with_request_body: {max_request_bytes: 8192, allow_partial_message: false,
                                  pack_as_bytes: true}
"""
# Envoy sends the original method, path (after path_prefix) and, with with_request_body, the
# body; the answer's headers are filtered by the matchers below.
HTTP_SERVICE = """\
              http_service:
                server_uri: {uri: "http://127.0.0.1:%(authz)d", cluster: authz, timeout: 2s}
                path_prefix: /check
                authorization_response:
                  allowed_upstream_headers: {patterns: [{prefix: x-authz-}]}
                  dynamic_metadata_from_headers: {patterns: [{prefix: x-md-}]}
              with_request_body: {max_request_bytes: 8192, allow_partial_message: false}
              # Unlike gRPC (every header), only Host, Method, Path, Content-Length and
              # Authorization go by default: add what the gateway's ext_authz reads.
              allowed_headers:
                patterns: [{exact: content-type}, {exact: accept}, {exact: origin},
                           {exact: user-agent}, {exact: x-request-id}, {prefix: mcp-},
                           {exact: x-forwarded-for}, {exact: x-forwarded-proto}]
"""
ENVOY = """\
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: %(admin)d}}
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: %(port)d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": %(hcm)s
          stat_prefix: bench
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              clear_route_cache: true
%(service)s
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: bench
              domains: ["*"]
              routes:
              - match: {prefix: /}
                direct_response:
                  status: 200
                  body: {inline_string: '{"jsonrpc":"2.0","id":7,"result":{"content":[]}}'}
                response_headers_to_add:
                - header: {key: x-seen-user, value: "%%REQ(x-authz-user)%%"}
                - header: {key: x-seen-metadata,
                           value: "%%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-md-mask-pii)%%"}
  clusters:
  - name: authz
    type: STATIC
    connect_timeout: 1s
%(h2)s    load_assignment:
      cluster_name: authz
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(authz)d}}}
"""
WRK_LUA = """\
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Authorization"] = "Bearer %(token)s"
wrk.headers["Mcp-Protocol-Version"] = "2025-11-25"
wrk.headers["Mcp-Method"] = "tools/call"
wrk.headers["Mcp-Name"] = "echo"
wrk.headers["User-Agent"] = "claude-code/2.1"
"""


# ------------------------------------------------------------------------------- servers

def _allow_response() -> Any:
    """The CheckResponse every gRPC mode answers, built per request as a real servicer does."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.auth.v3 import external_auth_pb2 as pb

    resp = pb.CheckResponse()
    resp.status.code = 0
    for name, value in UPSTREAM_HEADERS.items():
        opt = resp.ok_response.headers.add()
        opt.header.key, opt.header.value = name, value
        opt.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    resp.dynamic_metadata.update(METADATA)
    return resp


def _touch(token: str, body: bytes) -> None:
    """The per-request reads every mode does (what a real server must look at)."""
    if not token or not body:
        raise ValueError("request without token or body")


def serve_grpc(port: int, *, sync: bool) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    def check(request: Any) -> Any:
        http = request.attributes.request.http
        _touch(http.headers.get("authorization", ""), http.raw_body)
        return _allow_response()

    if sync:
        class SyncServicer(pb_grpc.AuthorizationServicer):  # type: ignore[misc]  # untyped stubs
            def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
                return check(request)

        server = grpc.server(ThreadPoolExecutor(max_workers=SYNC_WORKERS))
        pb_grpc.add_AuthorizationServicer_to_server(SyncServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        server.stop(0)
        return

    class AioServicer(pb_grpc.AuthorizationServicer):  # type: ignore[misc]  # untyped stubs
        async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
            return check(request)

    async def main() -> None:
        aio = grpc.aio.server()
        pb_grpc.add_AuthorizationServicer_to_server(AioServicer(), aio)
        aio.add_insecure_port(f"127.0.0.1:{port}")
        await aio.start()
        await _until_signal()
        await aio.stop(0)

    asyncio.run(main())


def serve_http(port: int) -> None:
    from aiohttp import web

    answer = {**UPSTREAM_HEADERS, **METADATA}

    async def check(request: web.Request) -> web.Response:
        _touch(request.headers.get("authorization", ""), await request.read())
        return web.Response(status=200, headers=answer)

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", check)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await _until_signal()
        await runner.cleanup()

    asyncio.run(main())


async def _until_signal() -> None:
    await stop_event().wait()


def serve(mode: str, port: int) -> None:
    if mode == "http-aiohttp":
        serve_http(port)
    else:
        serve_grpc(port, sync=mode == "grpc-sync")


# ------------------------------------------------------------------------------- harness

@dataclass
class Stack:
    mode: str
    port: int
    authz: Child
    envoy: Child


@dataclass
class Sample:
    mode: str
    ok: int
    errors: int
    seconds: float
    authz_us: float
    envoy_us: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds


def start_stack(procs: ProcessSet, work: Path, mode: str) -> Stack:
    from gateway import envoy_config
    authz_port, port, admin = free_port(), free_port(), free_port()
    authz = procs.start("authz", [sys.executable, str(Path(__file__).resolve()), "serve", mode,
                                  str(authz_port)], name=f"authz-{mode}")
    service = HTTP_SERVICE % {"authz": authz_port} if mode == "http-aiohttp" else GRPC_SERVICE
    config = work / f"envoy-{mode}.yaml"
    config.write_text(ENVOY % {"admin": admin, "port": port, "hcm": HCM_TYPE, "authz": authz_port,
                               "service": service.rstrip("\n"),
                               "h2": "" if mode == "http-aiohttp" else H2_OPTIONS})
    envoy = procs.start("envoy", [str(envoy_config.find_envoy()), "-c", str(config),
                                  "--log-level", "warn", "--disable-hot-restart",
                                  "--concurrency", "1", "--base-id", str(port)],
                        name=f"envoy-{mode}")
    stack = Stack(mode, port, authz, envoy)

    def alive() -> bool:
        return authz.proc.poll() is None and envoy.proc.poll() is None

    wait_until(lambda: probe(stack) is not None, timeout=START_TIMEOUT, what=f"{mode} stack",
               alive=alive, detail=lambda: authz.log_tail() + "\n" + envoy.log_tail())
    return stack


def probe(stack: Stack) -> dict[str, str] | None:
    """One request through Envoy: the echoed header and metadata, or None if not answering."""
    req = urllib.request.Request(f"http://127.0.0.1:{stack.port}/mcp/bench", data=BODY.encode(),
                                 method="POST", headers={"content-type": "application/json",
                                                         "authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310  # loopback only
            if resp.status != 200:
                return None
            return {"user": resp.headers.get("x-seen-user", ""),
                    "metadata": resp.headers.get("x-seen-metadata", "")}
    except OSError:
        return None


def run_wrk(stack: Stack, lua: Path, *, connections: int, seconds: float) -> tuple[int, int]:
    """(2xx answers, everything else) of one wrk run."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(lua),
            f"http://127.0.0.1:{stack.port}/mcp/bench"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                         check=True).stdout
    total = re.search(r"(\d+) requests in", out)
    if total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    bad = sum(int(m) for m in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    bad += sum(int(m) for m in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return int(total.group(1)) - bad, bad


def measure(stack: Stack, lua: Path, *, connections: int, seconds: float) -> Sample:
    pids = (stack.authz.pid, stack.envoy.pid)
    before = [cpu_seconds(p) or 0.0 for p in pids]
    t = time.monotonic()
    ok, bad = run_wrk(stack, lua, connections=connections, seconds=seconds)
    elapsed = time.monotonic() - t
    after = [cpu_seconds(p) or 0.0 for p in pids]
    per = [(a - b) / max(ok, 1) * 1e6 for a, b in zip(after, before, strict=True)]
    return Sample(stack.mode, ok, bad, elapsed, per[0], per[1])


def report(samples: Sequence[Sample], modes: Sequence[str], args: argparse.Namespace) -> str:
    lines = [f"wrk: 1 thread, {args.connections} connections, {args.seconds:g} s per window, "
             f"best of {args.rounds} rounds (lowest authz CPU per request), Envoy --concurrency 1,"
             f" ~{len(BODY)} B body, loopback.", "",
             "| mode | authz CPU us/req (best) | authz us/req (median) | Envoy CPU us/req | "
             "req/s | errors |", "|---|---:|---:|---:|---:|---:|"]
    for mode in modes:
        mine = [s for s in samples if s.mode == mode]
        best = min(mine, key=lambda s: s.authz_us)
        lines.append(f"| {mode} | {best.authz_us:.0f} | "
                     f"{statistics.median(s.authz_us for s in mine):.0f} | {best.envoy_us:.0f} | "
                     f"{best.rps:.0f} | {sum(s.errors for s in mine)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        serve(args_list[1], int(args_list[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(args_list)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        work = Path(tmp)
        lua = work / "post.lua"
        lua.write_text(WRK_LUA % {"body": json.dumps(BODY), "token": TOKEN})
        with ProcessSet(work / "logs") as procs:
            stacks = [start_stack(procs, work, mode) for mode in modes]
            for stack in stacks:
                seen = probe(stack)
                if seen != {"user": UPSTREAM_HEADERS["x-authz-user"],
                            "metadata": METADATA["x-md-mask-pii"]}:
                    raise SystemExit(f"{stack.mode}: header/metadata not carried: {seen}")
                run_wrk(stack, lua, connections=args.connections, seconds=args.warmup)
            samples = []
            for round_no in range(args.rounds):
                # Alternate the order so no mode always runs right after the same neighbour.
                order = stacks if round_no % 2 == 0 else stacks[::-1]
                for stack in order:
                    sample = measure(stack, lua, connections=args.connections,
                                     seconds=args.seconds)
                    print(f"round {round_no + 1} {sample.mode}: authz {sample.authz_us:.0f} us, "
                          f"envoy {sample.envoy_us:.0f} us, {sample.rps:.0f} req/s, "
                          f"{sample.errors} errors", file=sys.stderr, flush=True)
                    samples.append(sample)
    print(report(samples, modes, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
