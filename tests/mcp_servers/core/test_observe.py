"""Observability of the core: tool-call metrics, JSON logs with request ids, spans, the audit trail."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import logs as telemetry_logs
from gateway.telemetry import tracing
from gateway.telemetry.audit import AuditFileReport, args_digest, iter_audit
from mcp_servers.core import ServerSettings
from tests.gateway.telemetry.otlp_receiver import OtlpReceiver
from tests.mcp_servers.core.conftest import JSON_AND_SSE, Served, start

ROOT = Path(__file__).resolve().parents[3]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
V = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": V, "io.modelcontextprotocol/clientCapabilities": {}}
GATEWAY_HEADERS = {"x-mcp-user": "alice", "x-mcp-tenant": "acme", "x-mcp-client-id": "cli-1"}


def stateless_call(rid: int | str, tool: str, arguments: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a 2026-07-28 tools/call (no session needed)."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                         "params": {"name": tool, "arguments": arguments, "_meta": META}})
    headers = {"Content-Type": "application/json", "Accept": JSON_AND_SSE, "MCP-Protocol-Version": V,
               "Mcp-Method": "tools/call", "Mcp-Name": tool}
    return body, headers


def tool_calls(text: str, server: str) -> dict[tuple[str, str], float]:
    """(tool, outcome) -> count of mcp_gateway_tool_calls for ``server`` in a /metrics page."""
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "mcp_gateway_tool_calls":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["server"] == server:
                counts[(sample.labels["tool"], sample.labels["outcome"])] = sample.value
    return counts


async def metrics_page(served: Served) -> str:
    async with served.http.get(served.base + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


@pytest.fixture
async def audited(tmp_path: Path) -> AsyncIterator[tuple[Served, Path]]:
    path = tmp_path / "audit" / "core-test.jsonl"
    s = await start(ServerSettings(page_size=2, audit_file=str(path)))
    try:
        yield s, path
    finally:
        await s.http.close()
        await s.runner.cleanup()


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    handler = telemetry_logs.configure_logging("core-test", "INFO", stream=buf)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old_level)


async def test_metrics_count_tool_call_outcomes(served: Served) -> None:
    """/metrics is served and tools/call results move the ok, is_error and error counters."""
    before = tool_calls(await metrics_page(served), "core-test")
    await served.client.initialize()
    assert (await served.client.call("tools/call", {"name": "echo", "arguments": {"text": "a"}}))[0] == 200
    await served.client.call("tools/call", {"name": "fail", "arguments": {}})
    await served.client.call("tools/call", {"name": "no_such_tool", "arguments": {}})
    await served.client.call("tools/list")
    after = tool_calls(await metrics_page(served), "core-test")
    moved = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    assert moved == {("echo", "ok"): 1.0, ("fail", "is_error"): 1.0, ("no_such_tool", "error"): 1.0}


async def test_log_lines_carry_request_decision_and_trace_ids(served: Served,
                                                              log_stream: io.StringIO) -> None:
    """A line logged while handling a request carries its request, decision and trace ids and the sub."""
    body, headers = stateless_call(1, "crash", {})
    headers |= {**GATEWAY_HEADERS, "x-request-id": "req-log-1", "x-mcp-decision-id": "dec-1",
                "traceparent": TRACEPARENT}
    status, _ = await served.client.raw(body, headers)
    assert status == 200
    events = [orjson.loads(line) for line in log_stream.getvalue().splitlines()]
    crash = next(e for e in events if e["message"] == "tool crash failed")
    assert crash["request_id"] == "req-log-1" and crash["decision_id"] == "dec-1"
    assert crash["sub"] == "alice" and crash["tenant"] == "acme" and crash["client_id"] == "cli-1"
    assert crash["trace_id"] == TRACE_ID and crash["service"] == "core-test"
    assert crash["exc_type"] == "KeyError"


async def test_server_span_continues_the_incoming_trace(served: Served, otlp_receiver: OtlpReceiver) -> None:
    """A POST gets a SERVER span, child of the incoming traceparent, with mcp.method and mcp.tool."""
    assert tracing.setup_tracing("core-test", otlp_receiver.endpoint)
    try:
        body, headers = stateless_call(1, "echo", {"text": "x"})
        status, _ = await served.client.raw(body, {**headers, "traceparent": TRACEPARENT})
        assert status == 200
    finally:
        # The flush blocks on the exporter, which needs this loop to run the receiver.
        await asyncio.to_thread(tracing.shutdown_tracing)
    await otlp_receiver.wait_for(lambda: len(otlp_receiver.spans) >= 1)
    (service, span), = otlp_receiver.spans
    attributes = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
    assert service == "core-test" and span.name == "tools/call echo"
    assert span.kind == span.SPAN_KIND_SERVER
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_SPAN_ID
    assert attributes["mcp.method"] == "tools/call" and attributes["mcp.tool"] == "echo"
    assert attributes["mcp.outcome"] == "ok" and attributes["http.response.status_code"] == 200


async def test_audit_entry_for_each_executed_call(audited: tuple[Served, Path]) -> None:
    """tools/call, resources/read and prompts/get leave one entry each, on disk before the answer."""
    served, path = audited
    client = served.client
    await client.initialize(user="alice", identity={"x-mcp-tenant": "acme"})  # sessions keep their tenant
    ids = {"x-mcp-tenant": "acme", "x-mcp-client-id": "cli-1", "x-mcp-decision-id": "dec-7"}
    args = {"text": "secret-ish payload", "times": 2}
    await client.call("tools/call", {"name": "echo", "arguments": args}, {**ids, "x-request-id": "r-call"})
    await client.call("tools/call", {"name": "fail", "arguments": {}}, {"x-request-id": "r-fail"})
    await client.call("resources/read", {"uri": "test://items/missing"}, {"x-request-id": "r-read"})
    await client.call("prompts/get", {"name": "greet", "arguments": {"who": "bob"}},
                      {"x-request-id": "r-prompt"})
    await client.call("tools/list", None, {"x-request-id": "r-list"})
    # Read while the server still runs: group commit put each entry on disk before its answer.
    report = AuditFileReport()
    entries = {e["request_id"]: e for e in iter_audit(path, report)}
    assert set(entries) == {"r-call", "r-fail", "r-read", "r-prompt"} and not report.torn_tail
    call = entries["r-call"]
    assert call["method"] == "tools/call" and call["target"] == "echo" and call["server"] == "core-test"
    assert (call["sub"], call["tenant"], call["client_id"]) == ("alice", "acme", "cli-1")
    assert call["decision_id"] == "dec-7" and call["decision"] == "allow" and call["status"] == "ok"
    assert call["args_digest"] == args_digest(args) and call["latency_ms"] >= 0
    assert "secret-ish" not in path.read_text()
    assert entries["r-fail"]["status"] == "is_error" and entries["r-fail"]["decision"] == "unknown"
    assert entries["r-read"]["status"] == "resource_not_found"
    assert entries["r-read"]["target"] == "test://items/missing"
    assert entries["r-prompt"]["args_digest"] == args_digest({"who": "bob"})


async def test_unavailable_audit_withholds_the_result(audited: tuple[Served, Path]) -> None:
    """When the audit trail cannot take the entry, the client gets a 503 error, never the result."""
    served, _ = audited
    writer = served.transport.recorder.audit
    assert writer is not None
    await writer.close()
    body, headers = stateless_call(1, "echo", {"text": "must not leak"})
    status, answer = await served.client.raw(body, headers)
    assert status == 503 and "result" not in answer
    assert answer["error"]["data"]["reason"] == "audit_unavailable"


# ---- the real process: flags, shutdown flush, SIGKILL --------------------------------------------


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    port: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


async def _drain(proc: asyncio.subprocess.Process, lines: list[dict[str, Any]]) -> None:
    # Keep reading stderr so a chatty server never blocks on a full pipe.
    assert proc.stderr is not None
    async for raw in proc.stderr:
        try:
            lines.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            lines.append({"message": raw.decode(errors="replace")})


async def start_process(*args: str) -> Proc:
    env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.mcp_servers.core.audited_server", "--port", "0", *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while True:
            raw = await proc.stderr.readline()
            assert raw, f"server exited before listening: {lines}"
            event = orjson.loads(raw)
            lines.append(event)
            if event.get("message") == "listening":
                break
    running = Proc(proc, int(event["port"]), lines)
    running.drain = asyncio.create_task(_drain(proc, lines))
    return running


async def stop_process(p: Proc, sig: int = signal.SIGTERM) -> int:
    if p.proc.returncode is None:
        p.proc.send_signal(sig)
    code = await asyncio.wait_for(p.proc.wait(), timeout=20)
    if p.drain is not None:
        await asyncio.wait_for(p.drain, timeout=10)
    return code


async def test_process_flags_export_spans_log_ids_and_audit(tmp_path: Path,
                                                            otlp_receiver: OtlpReceiver) -> None:
    """--otlp-endpoint, --audit-file: the span is flushed at shutdown; logs and audit share the ids."""
    audit = tmp_path / "audited-1.jsonl"
    p = await start_process("--otlp-endpoint", otlp_receiver.endpoint, "--audit-file", str(audit))
    try:
        body, headers = stateless_call(1, "echo", {"text": "hi"})
        headers |= {**GATEWAY_HEADERS, "x-request-id": "req-p-1", "x-mcp-decision-id": "dec-p-1",
                    "traceparent": TRACEPARENT}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            async with http.post(p.url, data=body, headers=headers) as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{p.port}/metrics") as resp:
                assert 'mcp_gateway_tool_calls_total{outcome="ok",server="audited",tool="echo"} 1.0' \
                    in await resp.text()
    finally:
        assert await stop_process(p) == 0
    await otlp_receiver.wait_for(lambda: any(s.name == "tools/call echo" for _, s in otlp_receiver.spans))
    service, span = next((sv, s) for sv, s in otlp_receiver.spans if s.name == "tools/call echo")
    assert service == "audited" and span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_SPAN_ID
    echo = next(e for e in p.lines if e.get("message") == "echo called")
    assert echo["request_id"] == "req-p-1" and echo["decision_id"] == "dec-p-1"
    assert echo["trace_id"] == TRACE_ID and echo["sub"] == "alice" and echo["service"] == "audited"
    (entry,) = list(iter_audit(audit))
    assert entry["request_id"] == "req-p-1" and entry["trace_id"] == TRACE_ID
    assert entry["decision_id"] == "dec-p-1" and entry["service"] == "audited"


TOTAL = 300
CONCURRENCY = 16
KILL_AFTER = 100


async def test_sigkill_under_load_loses_no_answered_call(tmp_path: Path) -> None:
    """Every tools/call whose answer reached the client is in the audit file after a SIGKILL mid-load."""
    audit = tmp_path / "audited-2.jsonl"
    p = await start_process("--audit-file", str(audit))
    answered: list[str] = []
    failed = 0
    numbers = iter(range(TOTAL))
    killed = False
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:

            async def worker() -> None:
                nonlocal failed, killed
                for n in numbers:
                    rid = f"req-{n}"
                    body, headers = stateless_call(n, "echo", {"text": rid})
                    try:
                        headers["x-request-id"] = rid
                        async with http.post(p.url, data=body, headers=headers) as resp:
                            answer = await resp.json()
                    except (TimeoutError, aiohttp.ClientError):
                        failed += 1
                        continue
                    if resp.status == 200 and answer["result"]["content"][0]["text"] == rid:
                        answered.append(rid)
                    if len(answered) >= KILL_AFTER and not killed:
                        killed = True
                        p.proc.send_signal(signal.SIGKILL)

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), timeout=60)
    finally:
        code = await stop_process(p, signal.SIGKILL)
    assert killed and code == -signal.SIGKILL
    assert KILL_AFTER <= len(answered) < TOTAL and failed > 0
    report = AuditFileReport()
    audited = {e["request_id"]: e for e in iter_audit(audit, report)}
    missing = set(answered) - set(audited)
    assert not missing, f"{len(missing)} answered calls have no audit entry: {sorted(missing)[:5]}"
    assert all(audited[rid]["status"] == "ok" for rid in answered)
    assert report.entries == len(audited)
