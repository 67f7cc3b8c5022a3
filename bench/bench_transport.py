"""Transport benchmark (not a test): what the gateway's gRPC services cost per request over each
transport / server style, with the policy and inspection work taken out.

    .venv/bin/python bench/bench_transport.py [--service ext_authz|ext_proc] [--seconds 4]
        [--connections 16[,2]] [--rounds 3] [--modes a,b]

Each mode gets its own Envoy (``--concurrency 1``, plain HTTP on loopback) and its own server
process; only the filter's transport or the server's style differs between the Envoys.

``--service ext_authz`` (a ``direct_response`` route as the upstream):

- ``grpc-aio``: ``grpc_service`` to a ``grpc.aio`` server (xds-protos stubs, as ext_authz runs);
- ``grpc-sync``: the same servicer on a sync ``grpc.server`` with a ThreadPoolExecutor;
- ``http-aiohttp``: ``http_service`` to an aiohttp app; upstream headers through
  ``allowed_upstream_headers``, metadata through ``dynamic_metadata_from_headers``.

Every server does the same trivial work per request (reads the token and the ~1 KB body, answers
allow with 3 upstream headers and 3 dynamic metadata entries) so the difference is the transport.
Before measuring, a probe checks that the headers reached the request and the metadata reached
Envoy (the route echoes both back).

``--service ext_proc``: the ext_proc filter configured as ``envoy/templates/ext_proc_filter.yaml.tmpl``
renders it (response headers sent, ``allow_mode_override``, the ext_authz namespace forwarded,
response attributes), a ``set_metadata`` filter in front standing in for ext_authz's caller
context, and a shared upstream Envoy in its own process (``direct_response``, ~1 KB JSON answer)
whose CPU is reported separately. Every stream carries two messages: the response headers
(answered with ``mode_override`` to a BUFFERED body, as ``ext_proc.response`` builds it), then the
whole body (answered with a body mutation: the same bytes with a marker rewritten); the server
then ends the stream. Modes:

- ``grpc-aio``: ``grpc.aio`` bidi ``Process`` with ``context.read()`` / shielded
  ``context.write()``, as ``ext_proc/servicer.py`` runs;
- ``grpc-aio-iter``: ``grpc.aio`` async-generator handler (``async for req in request_iterator:
  yield resp``);
- ``grpc-sync-16`` / ``grpc-sync-64``: sync ``grpc.server``, ThreadPoolExecutor with 16 / 64
  workers, generator handler (a stream holds one worker for its life).

The probe checks that the marker came back rewritten (the body went through the server).

wrk posts the same JSON-RPC body with fixed connections; after a warm-up the modes are measured
in turn, ``--rounds`` times per connection count, and each mode's best round (lowest server CPU
per request) is reported with the median. CPU per request is utime+stime from /proc/<pid>/stat of
the process (all its threads) over the measured window divided by the 2xx answers.
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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.procs import Child, ProcessSet, cpu_seconds, free_port, wait_until  # noqa: E402
from gateway.signals import stop_event  # noqa: E402

SERVICES: dict[str, tuple[str, ...]] = {
    "ext_authz": ("grpc-aio", "grpc-sync", "http-aiohttp"),
    "ext_proc": ("grpc-aio", "grpc-aio-iter", "grpc-sync-16", "grpc-sync-64"),
}
DEFAULT_CONNECTIONS = {"ext_authz": "16", "ext_proc": "16,2"}
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

# ext_proc: the upstream's ~1 KB JSON-RPC answer carries MARKER_IN once; the servicer rewrites it
# to MARKER_OUT (same length), so a body that comes back with MARKER_OUT went through ext_proc.
MARKER_IN = b'"inspected":"no"'
MARKER_OUT = b'"inspected":"ok"'
UPSTREAM_BODY = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {
    "content": [{"type": "text", "text": "y" * 900}], "isError": False, "inspected": "no"}},
    separators=(",", ":"))
# The caller context ext_authz files as dynamic metadata (ext_proc/metadata.py reads these
# fields); a set_metadata filter puts it on every request so each message carries it.
CALLER_CONTEXT = {"mcp_method": "tools/call", "server": "bench", "sub": "bench-user",
                  "roles": ["engineer"], "mask": ["email", "phone"],
                  "decision_id": "5b0f6f2e-6c3e-4a0e-9d1c-2f1e7c9b8a01", "tool": "echo",
                  "tenant": "acme", "request_id": "0c4d1c5e-2f7a-4c1b-9b3e-6d8f0a1e2b3c"}
CONTEXT_NAMESPACE = "envoy.filters.http.ext_authz"
# The filter as envoy/templates/ext_proc_filter.yaml.tmpl renders it (timeout 2 s).
EXT_PROC_ENVOY = """\
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
          - name: envoy.filters.http.set_metadata
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config
              metadata:
              - metadata_namespace: %(namespace)s
                value: %(context)s
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {cluster_name: ext_proc}
                timeout: 2s
              failure_mode_allow: false
              status_on_error: {code: BadGateway}
              observability_mode: false
              send_body_without_waiting_for_header_response: false
              message_timeout: 2s
              max_message_timeout: 2s
              processing_mode:
                request_header_mode: SKIP
                request_body_mode: NONE
                request_trailer_mode: SKIP
                response_header_mode: SEND
                response_body_mode: NONE
                response_trailer_mode: SKIP
              allow_mode_override: true
              disable_immediate_response: false
              metadata_options:
                forwarding_namespaces:
                  untyped: [%(namespace)s]
              response_attributes: ["request.id", "request.headers['traceparent']"]
              mutation_rules:
                disallow_system: true
                disallow_is_error: true
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: bench
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: upstream, timeout: 5s}
  clusters:
  - name: ext_proc
    type: STATIC
    connect_timeout: 1s
%(h2)s    load_assignment:
      cluster_name: ext_proc
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(server)d}}}
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(upstream)d}}}
"""
# The upstream: reads the whole request (buffer filter: a direct_response sent before the request
# body is read would make Envoy close the HTTP/1.1 connection) and answers the JSON body.
UPSTREAM_ENVOY = """\
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
          stat_prefix: upstream
          http_filters:
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 65536
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: upstream
              domains: ["*"]
              routes:
              - match: {prefix: /}
                direct_response:
                  status: 200
                  body: {inline_string: %(body)s}
                response_headers_to_add:
                - header: {key: content-type, value: application/json}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
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


def _serve_sync(add: Callable[[Any], None], port: int, *, workers: int) -> None:
    import grpc

    # Blocked before the server's threads exist, so they inherit the mask and sigwait gets the
    # signal (an unblocked SIGTERM would kill the process before server.stop()).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = grpc.server(ThreadPoolExecutor(max_workers=workers))
    add(server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(0)


def _serve_aio(add: Callable[[Any], None], port: int) -> None:
    import grpc

    async def main() -> None:
        aio = grpc.aio.server()
        add(aio)
        aio.add_insecure_port(f"127.0.0.1:{port}")
        await aio.start()
        await _until_signal()
        await aio.stop(0)

    asyncio.run(main())


def serve_grpc(port: int, *, sync: bool) -> None:
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    def check(request: Any) -> Any:
        http = request.attributes.request.http
        _touch(http.headers.get("authorization", ""), http.raw_body)
        return _allow_response()

    if sync:
        class SyncServicer(pb_grpc.AuthorizationServicer):  # type: ignore[misc]  # untyped stubs
            def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
                return check(request)

        _serve_sync(lambda s: pb_grpc.add_AuthorizationServicer_to_server(SyncServicer(), s),
                    port, workers=SYNC_WORKERS)
        return

    class AioServicer(pb_grpc.AuthorizationServicer):  # type: ignore[misc]  # untyped stubs
        async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
            return check(request)

    _serve_aio(lambda s: pb_grpc.add_AuthorizationServicer_to_server(AioServicer(), s), port)


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


def process_answer(req: Any) -> tuple[Any, bool]:
    """ext_proc's answer to one message and whether it ends the stream, built with the real
    ``ext_proc.response`` builders; the checks are the reads ext_proc does on each message."""
    from ext_proc import response as out

    kind = req.WhichOneof("request")
    if kind == "response_headers":
        if CONTEXT_NAMESPACE not in req.metadata_context.filter_metadata:
            raise ValueError("no caller context in the metadata")
        for h in req.response_headers.headers.headers:
            if h.key == "content-type" and h.raw_value == b"application/json":
                return out.inspect_response_body(out.BUFFERED), False
        return out.continue_response_headers(), True
    if kind == "response_body" and req.response_body.end_of_stream:
        return out.replace_body(req.response_body.body.replace(MARKER_IN, MARKER_OUT)), True
    raise ValueError(f"unexpected processing request {kind!r}")


def serve_ext_proc(mode: str, port: int) -> None:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    add = pb_grpc.add_ExternalProcessorServicer_to_server
    if mode.startswith("grpc-sync-"):
        class SyncProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # untyped stubs
            def Process(self, request_iterator: Iterator[Any], context: Any  # noqa: N802
                        ) -> Iterator[Any]:
                for req in request_iterator:
                    resp, done = process_answer(req)
                    yield resp
                    if done:
                        return

        _serve_sync(lambda s: add(SyncProcessor(), s), port, workers=int(mode.rsplit("-", 1)[1]))
        return

    class IterProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # untyped stubs
        async def Process(self, request_iterator: AsyncIterator[Any], context: Any  # noqa: N802
                          ) -> AsyncIterator[Any]:
            async for req in request_iterator:
                resp, done = process_answer(req)
                yield resp
                if done:
                    return

    class ReadWriteProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # untyped stubs
        """The shape of ext_proc/servicer.py's ``Process``: reads with ``context.read()``, each
        write shielded from the handler's cancellation."""

        async def Process(self, request_iterator: object, context: Any) -> None:  # noqa: N802
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    return
                resp, done = process_answer(req)
                write = asyncio.ensure_future(context.write(resp))
                write.add_done_callback(_retrieve)
                await asyncio.shield(write)
                if done:
                    return

    servicer = IterProcessor() if mode == "grpc-aio-iter" else ReadWriteProcessor()
    _serve_aio(lambda s: add(servicer, s), port)


def _retrieve(write: asyncio.Future[None]) -> None:
    if not write.cancelled():
        write.exception()


def serve(service: str, mode: str, port: int) -> None:
    if service == "ext_proc":
        serve_ext_proc(mode, port)
    elif mode == "http-aiohttp":
        serve_http(port)
    else:
        serve_grpc(port, sync=mode == "grpc-sync")


# ------------------------------------------------------------------------------- harness

@dataclass
class Stack:
    service: str
    mode: str
    port: int
    server: Child
    envoy: Child
    upstream: Child | None  # shared by every ext_proc stack; measured with each


@dataclass
class Sample:
    mode: str
    connections: int
    ok: int
    errors: int
    seconds: float
    server_us: float
    envoy_us: float
    upstream_us: float | None

    @property
    def rps(self) -> float:
        return self.ok / self.seconds


def _envoy_argv(config: Path, port: int) -> list[str]:
    from gatewayctl import envoy_config
    return [str(envoy_config.find_envoy()), "-c", str(config), "--log-level", "warn",
            "--disable-hot-restart", "--concurrency", "1", "--base-id", str(port)]


def start_upstream(procs: ProcessSet, work: Path) -> tuple[Child, int]:
    """The ext_proc stacks' upstream Envoy and its port, answering."""
    port, admin = free_port(), free_port()
    config = work / "envoy-upstream.yaml"
    config.write_text(UPSTREAM_ENVOY % {"admin": admin, "port": port, "hcm": HCM_TYPE,
                                        "body": json.dumps(UPSTREAM_BODY)})
    upstream = procs.start("upstream", _envoy_argv(config, port), name="envoy-upstream")

    def answers() -> bool:
        seen = _post(port)
        return seen is not None and MARKER_IN in seen[1]

    wait_until(answers, timeout=START_TIMEOUT, what="upstream", alive=lambda: upstream.proc.poll()
               is None, detail=upstream.log_tail)
    return upstream, port


def start_stack(procs: ProcessSet, work: Path, service: str, mode: str,
                upstream: tuple[Child, int] | None) -> Stack:
    server_port, port, admin = free_port(), free_port(), free_port()
    server = procs.start(service, [sys.executable, str(Path(__file__).resolve()), "serve",
                                   service, mode, str(server_port)], name=f"{service}-{mode}")
    config = work / f"envoy-{service}-{mode}.yaml"
    if service == "ext_proc":
        assert upstream is not None
        config.write_text(EXT_PROC_ENVOY % {
            "admin": admin, "port": port, "hcm": HCM_TYPE, "server": server_port,
            "upstream": upstream[1], "h2": H2_OPTIONS, "namespace": CONTEXT_NAMESPACE,
            "context": json.dumps(CALLER_CONTEXT)})
    else:
        http = mode == "http-aiohttp"
        service_block = HTTP_SERVICE % {"authz": server_port} if http else GRPC_SERVICE
        config.write_text(ENVOY % {"admin": admin, "port": port, "hcm": HCM_TYPE,
                                   "authz": server_port, "service": service_block.rstrip("\n"),
                                   "h2": "" if http else H2_OPTIONS})
    envoy = procs.start("envoy", _envoy_argv(config, port), name=f"envoy-{service}-{mode}")
    stack = Stack(service, mode, port, server, envoy, upstream[0] if upstream else None)

    def alive() -> bool:
        return server.proc.poll() is None and envoy.proc.poll() is None

    wait_until(lambda: _post(stack.port) is not None, timeout=START_TIMEOUT,
               what=f"{service} {mode} stack", alive=alive,
               detail=lambda: server.log_tail() + "\n" + envoy.log_tail())
    return stack


def _post(port: int) -> tuple[dict[str, str], bytes] | None:
    """One request: the answer's headers (lower-cased names) and body, or None if not a 200."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/mcp/bench", data=BODY.encode(),
                                 method="POST", headers={"content-type": "application/json",
                                                         "authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310  # loopback only
            if resp.status != 200:
                return None
            return {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except OSError:
        return None


def probe_problem(stack: Stack) -> str | None:
    """What the probe request shows is not carried through, or None when all of it is."""
    seen = _post(stack.port)
    if seen is None:
        return "no 200 answer"
    headers, body = seen
    if stack.service == "ext_proc":
        if MARKER_OUT not in body or MARKER_IN in body:
            return f"body not rewritten by ext_proc: {body[:120]!r}..."
        return None
    carried = {"user": headers.get("x-seen-user", ""), "metadata": headers.get("x-seen-metadata", "")}
    if carried != {"user": UPSTREAM_HEADERS["x-authz-user"], "metadata": METADATA["x-md-mask-pii"]}:
        return f"header/metadata not carried: {carried}"
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
    pids = [stack.server.pid, stack.envoy.pid]
    if stack.upstream is not None:
        pids.append(stack.upstream.pid)
    before = [cpu_seconds(p) or 0.0 for p in pids]
    t = time.monotonic()
    ok, bad = run_wrk(stack, lua, connections=connections, seconds=seconds)
    elapsed = time.monotonic() - t
    after = [cpu_seconds(p) or 0.0 for p in pids]
    per = [(a - b) / max(ok, 1) * 1e6 for a, b in zip(after, before, strict=True)]
    return Sample(stack.mode, connections, ok, bad, elapsed, per[0], per[1],
                  per[2] if len(per) > 2 else None)


def report(samples: Sequence[Sample], modes: Sequence[str], service: str, connections: int,
           args: argparse.Namespace) -> str:
    server = "authz" if service == "ext_authz" else "ext_proc"
    upstream = service == "ext_proc"
    lines = [f"{service}: wrk 1 thread, {connections} connections, {args.seconds:g} s per window, "
             f"best of {args.rounds} rounds (lowest {server} CPU per request), Envoy "
             f"--concurrency 1, ~{len(BODY)} B request body"
             + (f", ~{len(UPSTREAM_BODY)} B answer body" if upstream else "") + ", loopback.", "",
             f"| mode | {server} CPU us/req (best) | {server} us/req (median) | Envoy CPU us/req | "
             + ("upstream CPU us/req | " if upstream else "") + "req/s | errors |",
             "|---|---:|---:|---:|" + ("---:|" if upstream else "") + "---:|---:|"]
    for mode in modes:
        mine = [s for s in samples if s.mode == mode and s.connections == connections]
        best = min(mine, key=lambda s: s.server_us)
        up = f" {best.upstream_us:.0f} |" if best.upstream_us is not None else ""
        lines.append(f"| {mode} | {best.server_us:.0f} | "
                     f"{statistics.median(s.server_us for s in mine):.0f} | {best.envoy_us:.0f} |"
                     f"{up} {best.rps:.0f} | {sum(s.errors for s in mine)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        serve(args_list[1], args_list[2], int(args_list[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--service", choices=sorted(SERVICES), default="ext_authz")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", default=None,
                        help="comma-separated wrk connection counts (ext_authz: 16, ext_proc: 16,2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=None, help="comma-separated (default: all of the service)")
    args = parser.parse_args(args_list)
    service: str = args.service
    modes = [m for m in (args.modes or ",".join(SERVICES[service])).split(",") if m]
    if unknown := set(modes) - set(SERVICES[service]):
        parser.error(f"unknown {service} modes: {sorted(unknown)}")
    try:
        counts = [int(c) for c in (args.connections or DEFAULT_CONNECTIONS[service]).split(",") if c]
    except ValueError:
        parser.error("--connections takes comma-separated integers")
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        work = Path(tmp)
        lua = work / "post.lua"
        lua.write_text(WRK_LUA % {"body": json.dumps(BODY), "token": TOKEN})
        samples = []
        with ProcessSet(work / "logs") as procs:
            upstream = start_upstream(procs, work) if service == "ext_proc" else None
            stacks = [start_stack(procs, work, service, mode, upstream) for mode in modes]
            for stack in stacks:
                if problem := probe_problem(stack):
                    raise SystemExit(f"{service} {stack.mode}: {problem}")
            for connections in counts:
                for stack in stacks:
                    run_wrk(stack, lua, connections=connections, seconds=args.warmup)
                for round_no in range(args.rounds):
                    # Alternate the order so no mode always runs right after the same neighbour.
                    order = stacks if round_no % 2 == 0 else stacks[::-1]
                    for stack in order:
                        sample = measure(stack, lua, connections=connections,
                                         seconds=args.seconds)
                        up = ("" if sample.upstream_us is None
                              else f", upstream {sample.upstream_us:.0f} us")
                        print(f"c{connections} round {round_no + 1} {sample.mode}: server "
                              f"{sample.server_us:.0f} us, envoy {sample.envoy_us:.0f} us{up}, "
                              f"{sample.rps:.0f} req/s, {sample.errors} errors",
                              file=sys.stderr, flush=True)
                        samples.append(sample)
    print("\n\n".join(report(samples, modes, service, c, args) for c in counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
