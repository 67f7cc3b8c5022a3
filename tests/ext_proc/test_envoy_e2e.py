"""End to end through the real Envoy binary: ext_authz hands the caller context to ext_proc as
dynamic metadata, ext_proc masks JSON and SSE answers and filters lists, and a dead ext_proc
never lets an answer through.

Everything but Envoy runs in this test's event loop: a stand-in ext_authz (grpc.aio) that turns an
``x-test-caller`` JSON header into its CheckResponse dynamic metadata (the contract the real
ext_authz follows), the real ext_proc service, and an aiohttp upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2  # type: ignore[import-untyped]

from ext_proc import servicer
from ext_proc.app import Service, start_service
from ext_proc.servicer import RESPONSE_ATTRIBUTES
from gateway.catalog import Catalog
from gateway.sse import SseParser
from gatewayctl.envoy_config import find_envoy
from tests.ext_proc.conftest import CARD, EMAIL, TOOLS, StandinPolicy, caller, make_settings

READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)


class MetadataAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Allows everything; the x-test-caller header (JSON) becomes the dynamic metadata."""

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
        resp = external_auth_pb2.CheckResponse()
        resp.status.code = code_pb2.OK
        resp.ok_response.SetInParent()
        raw = request.attributes.request.http.headers.get("x-test-caller")
        if raw:
            resp.dynamic_metadata.update(json.loads(raw))
        return resp


def jsonrpc(result: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": result})


SECRET_TEXT = f"Customer {EMAIL} paid with {CARD}."
TOOL_RESULT = {"content": [{"type": "text", "text": SECRET_TEXT}], "isError": False}


async def answer_json(request: web.Request) -> web.Response:
    return web.Response(body=jsonrpc(TOOL_RESULT), content_type="application/json")


async def answer_list(request: web.Request) -> web.Response:
    return web.Response(body=jsonrpc({"tools": TOOLS, "nextCursor": "c2"}),
                        content_type="application/json")


async def answer_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    note = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                         "params": {"level": "info", "data": f"looking up {EMAIL}"}})
    payload = b"id: 1\ndata: " + note + b"\n\nid: 2\ndata: " + jsonrpc(
        TOOL_RESULT if request.path == "/sse" else {"tools": TOOLS}) + b"\n\n"
    # Cut inside the e-mail address and inside the second event's data: Envoy forwards the parts as
    # separate chunks when the upstream flushes them separately.
    cut1, cut2 = payload.index(b"@"), payload.index(b"id: 2") + 20
    for part in (payload[:cut1], payload[cut1:cut2], payload[cut2:]):
        await resp.write(part)
        await asyncio.sleep(0)  # yield so each part is flushed on its own
    await resp.write_eof()
    return resp


async def answer_sse_broken(request: web.Request) -> web.StreamResponse:
    """One good event, then an event whose data is not JSON (and carries PII)."""
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"id: 1\ndata: " + jsonrpc(TOOL_RESULT) + b"\n\n")
    await asyncio.sleep(0)
    await resp.write(b"id: 2\ndata: not json " + EMAIL.encode() + b"\n\n")
    await resp.write_eof()
    return resp


ENVOY_YAML = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: e2e
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream, timeout: 10s}}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              grpc_service: {{envoy_grpc: {{cluster_name: ext_authz}}, timeout: 5s}}
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: {{envoy_grpc: {{cluster_name: ext_proc}}, timeout: 5s}}
              failure_mode_allow: false
              allow_mode_override: true
              message_timeout: 5s
              processing_mode:
                request_header_mode: SKIP
                response_header_mode: SEND
                request_body_mode: NONE
                response_body_mode: NONE
              metadata_options:
                forwarding_namespaces:
                  untyped: ["envoy.filters.http.ext_authz"]
              response_attributes: {attributes}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - {cluster}
  - {authz}
  - {proc}
"""


HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager")


def cluster(name: str, port: int, *, grpc_cluster: bool) -> str:
    spec: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }
    if grpc_cluster:
        spec["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return json.dumps(spec)


@dataclass
class Stack:
    url: str
    ext_proc: Service
    policy: StandinPolicy
    envoy_log: Path

    async def post(self, path: str, meta: dict[str, Any] | None,
                   extra: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        headers = {"content-type": "application/json", **(extra or {})}
        if meta is not None:
            headers["x-test-caller"] = json.dumps(meta)
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http, \
                http.post(self.url + path, data=b'{"jsonrpc":"2.0","id":1,"method":"x"}',
                          headers=headers) as resp:
            try:
                body = await resp.read()
            except aiohttp.ClientPayloadError:
                body = b""  # a reset mid-body is also a refusal; the client got nothing usable
            return resp.status, resp.headers.get("content-type", ""), body


async def _wait_admin(admin_file: Path, proc: subprocess.Popen[bytes], log: Path) -> str:
    """The listener URL once Envoy is ready (polled via the admin API, bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while loop.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"envoy exited: {log.read_text()[-3000:]}")
            admin = admin_file.read_text().strip() if admin_file.exists() else ""
            if admin:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://{admin}/listeners?format=json") as resp:
                        data = await resp.json()
                    addr = data["listener_statuses"][0]["local_address"]["socket_address"]
                    if addr.get("port_value"):
                        async with http.get(f"http://{admin}/ready") as ready:
                            if ready.status == 200:
                                return f"http://127.0.0.1:{addr['port_value']}"
            await asyncio.sleep(0.05)  # polling interval, bounded by the deadline
    raise AssertionError(f"envoy not ready in {READY_TIMEOUT}s: {log.read_text()[-3000:]}")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    app = web.Application()
    app.router.add_post("/json", answer_json)
    app.router.add_post("/list", answer_list)
    app.router.add_post("/sse", answer_sse)
    app.router.add_post("/list-sse", answer_sse)
    app.router.add_post("/sse-broken", answer_sse_broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = runner.addresses[0][1]

    authz = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(MetadataAuthz(), authz)
    authz_port = authz.add_insecure_port("127.0.0.1:0")
    await authz.start()

    policy = StandinPolicy()
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.refresh("files", TOOLS)
    ext_proc = await start_service(make_settings(message_timeout_seconds=4.0), policy, catalog=catalog)

    config = tmp_path / "envoy.yaml"
    config.write_text(ENVOY_YAML.format(
        hcm=HCM_TYPE, attributes=json.dumps(list(RESPONSE_ATTRIBUTES)),
        cluster=cluster("upstream", upstream_port, grpc_cluster=False),
        authz=cluster("ext_authz", authz_port, grpc_cluster=True),
        proc=cluster("ext_proc", ext_proc.port, grpc_cluster=True)), encoding="utf-8")
    admin_file = tmp_path / "admin.txt"
    log = tmp_path / "envoy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(find_envoy()), "-c", str(config), "--use-dynamic-base-id", "--admin-address-path",
             str(admin_file), "--log-level", "warn", "--concurrency", "1"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        url = await _wait_admin(admin_file, proc, log)
        yield Stack(url, ext_proc, policy, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        await ext_proc.stop(grace=None)
        await authz.stop(None)
        await runner.cleanup()


async def test_tool_results_reach_the_client_masked(stack: Stack) -> None:
    """An email and a card number in a tools/call result are masked over JSON and over SSE."""
    status, ctype, body = await stack.post("/json", caller())
    assert status == 200 and ctype.startswith("application/json"), body
    text = orjson.loads(body)["result"]["content"][0]["text"]
    assert text == "Customer [REDACTED:email] paid with [REDACTED:card]."

    status, ctype, body = await stack.post("/sse", caller())
    assert status == 200 and ctype.startswith("text/event-stream"), body
    assert EMAIL.encode() not in body and b"4111" not in body
    events = SseParser().feed(body)
    assert [e.id for e in events] == ["1", "2"]
    assert orjson.loads(events[0].data or "")["params"]["data"] == "looking up [REDACTED:email]"
    assert orjson.loads(events[1].data or "")["result"]["content"][0]["text"] == \
        "Customer [REDACTED:email] paid with [REDACTED:card]."


async def test_tools_list_is_filtered(stack: Stack) -> None:
    """A user sees only the tools the policy allows, over JSON and SSE; the cursor is kept."""
    meta = caller(mcp_method="tools/list", tool=None)
    status, _, body = await stack.post("/list", meta)
    assert status == 200, body
    result = orjson.loads(body)["result"]
    assert [t["name"] for t in result["tools"]] == ["read_file", "stat"]
    assert result["nextCursor"] == "c2"

    status, _, body = await stack.post("/list-sse", meta)
    assert status == 200, body
    events = SseParser().feed(body)
    assert [t["name"] for t in orjson.loads(events[1].data or "")["result"]["tools"]] == \
        ["read_file", "stat"]


async def test_missing_metadata_is_refused(stack: Stack) -> None:
    """Without ext_authz's caller context the client gets a JSON-RPC error, not the answer."""
    status, _, body = await stack.post("/json", None)
    assert status == 500
    assert orjson.loads(body)["error"]["data"]["reason"] == "metadata_missing"


async def test_request_ids_arrive_without_request_headers(stack: Stack,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Request headers are skipped, yet the response headers bring the request's id and
    traceparent (response_attributes) and ext_authz's metadata (masking needs it)."""
    seen: list[tuple[str | None, dict[str, str], str | None]] = []
    original = servicer.request_ids

    def spy(req: Any) -> tuple[dict[str, str], str | None]:
        result = original(req)
        seen.append((req.WhichOneof("request"), *result))
        return result

    monkeypatch.setattr(servicer, "request_ids", spy)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    status, _, body = await stack.post("/json", caller(), {"traceparent": parent,
                                                           "x-request-id": "req-42"})
    assert status == 200 and EMAIL.encode() not in body
    assert seen == [("response_headers", {"traceparent": parent}, "req-42")]


async def test_broken_sse_stream_is_cut_not_passed(stack: Stack) -> None:
    """A stream that turns uninspectable mid-way is cut: the client never sees the bad event."""
    _, _, body = await stack.post("/sse-broken", caller())
    assert EMAIL.encode() not in body and b"not json" not in body
    assert b"4111" not in body


async def test_ext_proc_down_never_leaks(stack: Stack) -> None:
    """With ext_proc stopped the client gets an error and never the unmasked body."""
    await stack.ext_proc.stop(grace=None)
    for path in ("/json", "/sse"):
        status, _, body = await stack.post(path, caller())
        assert status >= 500
        assert EMAIL.encode() not in body and b"4111" not in body
