"""ext_proc benchmark (not a test): CPU per inspected response and the latency ext_proc adds.

    .venv/bin/python bench/bench_ext_proc.py [--requests N]

Scenarios: the echo workload's answer (a 1 KB ``tools/call`` result without PII, the masker
still scans it), a 10 KB ``tools/call`` result with PII (``bench.payloads.report_text``) masked
as JSON and as SSE (email, phone, card, iban, ssn), and a 40-tool ``tools/list`` filtered by the
real embedded Rego policy (``policies/``, one ``visible_tools`` query) plus the pinned catalog.
Each runs as the rendered Envoy config sends it (2 messages: response headers carrying the
caller context, then the body) and, for comparison, with request headers sent too (3 messages,
the caller context on the first).

1. In-process: ``time.process_time`` per full Process exchange driven straight into the
   servicer: the Python cost without gRPC.
2. Over the wire: the real grpc.aio server in its own process on loopback and a grpc.aio client
   in this one, one exchange at a time: p50/p99 of the exchange (what Envoy waits for) and the
   server process's CPU per exchange (from /proc: what an ext_proc instance spends per request).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.payloads import echo_arguments, report_text  # noqa: E402
from bench.procs import cpu_seconds  # noqa: E402
from ext_proc.app import start_service  # noqa: E402
from ext_proc.inspect import Inspector  # noqa: E402
from ext_proc.metadata import NAMESPACE  # noqa: E402
from ext_proc.servicer import (  # noqa: E402
    ATTRIBUTES_NAMESPACE,
    REQUEST_ID_ATTRIBUTE,
    TRACEPARENT_ATTRIBUTE,
    ExternalProcessorServicer,
)
from ext_proc.settings import Settings  # noqa: E402
from gateway.catalog import Catalog  # noqa: E402
from gateway.config import Instance, PolicyConfig  # noqa: E402
from gateway.policy.factory import build_engine  # noqa: E402

MASK = ["email", "phone", "card", "iban", "ssn"]
TOOLS = [{"name": n, "description": f"tool {n}", "inputSchema": {"type": "object"}}
         for n in ("list_directory", "stat", "read_file", "search", "write_file",
                   *(f"extra_{i}" for i in range(35)))]


def meta(method: str) -> dict[str, Any]:
    return {"mcp_method": method, "server": "files", "tool": "read_file", "sub": "alice",
            "tenant": "acme", "roles": ["viewer"], "scope": "tools:call:files/*", "mask": MASK,
            "decision_id": "bench", "request_id": "bench"}


# The client's trace context, so both sequences make the same (non-recording) span.
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def exchange(method: str, content_type: str, body: bytes, *, request_headers: bool
             ) -> list[pb.ProcessingRequest]:
    """The messages of one exchange; the caller context on the first (as Envoy sends it)."""
    headers = pb.ProcessingRequest()
    headers.response_headers.headers.headers.add(key=":status", raw_value=b"200")
    headers.response_headers.headers.headers.add(key="content-type", raw_value=content_type.encode())
    attrs = headers.attributes[ATTRIBUTES_NAMESPACE].fields
    attrs[REQUEST_ID_ATTRIBUTE].string_value = "bench"
    attrs[TRACEPARENT_ATTRIBUTE].string_value = TRACEPARENT
    chunk = pb.ProcessingRequest()
    chunk.response_body.body = body
    chunk.response_body.end_of_stream = True
    first = headers
    if request_headers:
        first = pb.ProcessingRequest()
        first.request_headers.headers.headers.add(key=":path", raw_value=b"/mcp/files")
        first.request_headers.headers.headers.add(key="x-request-id", raw_value=b"bench")
        first.request_headers.headers.headers.add(key="traceparent", raw_value=TRACEPARENT.encode())
        del headers.attributes[ATTRIBUTES_NAMESPACE]
    first.metadata_context.filter_metadata[NAMESPACE].update(meta(method))
    return [first, headers, chunk] if request_headers else [headers, chunk]


def scenarios() -> dict[str, list[pb.ProcessingRequest]]:
    result = {"content": [{"type": "text", "text": report_text()}], "isError": False}
    msg = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": result})
    listing = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS}})
    echo = {"content": [{"type": "text", "text": orjson.dumps(echo_arguments()).decode()}],
            "isError": False}
    cases = {
        "tools/call 1 KB echo masked, JSON": ("tools/call", "application/json",
                                              orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": echo})),
        "tools/call 10 KB masked, JSON": ("tools/call", "application/json", msg),
        "tools/call 10 KB masked, SSE": ("tools/call", "text/event-stream", b"data: " + msg + b"\n\n"),
        "tools/list 40 tools filtered (Rego + catalog)": ("tools/list", "application/json", listing),
    }
    out: dict[str, list[pb.ProcessingRequest]] = {}
    for name, (method, ctype, body) in cases.items():
        out[f"{name}, 2 msgs"] = exchange(method, ctype, body, request_headers=False)
        out[f"{name}, 3 msgs (+ request headers)"] = exchange(method, ctype, body, request_headers=True)
    return out


async def _iter(items: list[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingRequest]:
    for item in items:
        yield item


async def in_process(servicer: ExternalProcessorServicer, reqs: list[pb.ProcessingRequest],
                     n: int) -> float:
    for _ in range(20):  # warm caches (masker, validators, policy bundle)
        [r async for r in servicer.process(_iter(reqs), None)]
    start = time.process_time()
    for _ in range(n):
        out = [r async for r in servicer.process(_iter(reqs), None)]
    cpu = (time.process_time() - start) / n
    assert out[-1].WhichOneof("response") == "response_body", out[-1]
    return cpu * 1e6


async def over_wire(port: int, server_pid: int, reqs: list[pb.ProcessingRequest], n: int
                    ) -> tuple[float, float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def one() -> None:
            call = stub.Process(timeout=10)
            for req in reqs:
                await call.write(req)
                resp = await call.read()
                assert resp.WhichOneof("response") != "immediate_response", resp
            await call.done_writing()

        for _ in range(20):
            await one()
        lat: list[float] = []
        cpu0 = cpu_seconds(server_pid)
        for _ in range(n):
            t = time.perf_counter()
            await one()
            lat.append(time.perf_counter() - t)
        cpu1 = cpu_seconds(server_pid)
    assert cpu0 is not None and cpu1 is not None, "the ext_proc process died"
    lat.sort()
    return statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99) - 1] * 1e3, (cpu1 - cpu0) / n * 1e6


ENTRY = "mcp/authz/visible_tools"


def build(catalog_path: Path) -> tuple[Settings, Any, Catalog]:
    engine = build_engine(PolicyConfig(dir=str(ROOT / "policies")), extra_entrypoints=(ENTRY,))
    catalog = Catalog(catalog_path)
    catalog.refresh("files", TOOLS)
    settings = Settings(listen=Instance("127.0.0.1", 0), policy=PolicyConfig(),
                        catalog_path=None, message_timeout_seconds=5.0)
    return settings, engine, catalog


def serve(conn: multiprocessing.connection.Connection, catalog_path: Path) -> None:
    """The child process: one ext_proc service on port 0; sends the port, stops on a message."""
    async def run() -> None:
        settings, engine, catalog = build(catalog_path)
        service = await start_service(settings, engine, catalog=catalog)
        conn.send(service.port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await service.stop(grace=None)

    asyncio.run(run())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings, engine, catalog = build(Path(tmp) / "catalog.sqlite")
        await engine.start()
        servicer = ExternalProcessorServicer(settings, Inspector(
            policy=engine, list_entrypoints={"tools": ENTRY}, catalog=catalog))
        ours, theirs = multiprocessing.Pipe()
        child = multiprocessing.get_context("spawn").Process(
            target=serve, args=(theirs, Path(tmp) / "server.sqlite"), daemon=True)
        child.start()
        try:
            if not ours.poll(60):
                raise SystemExit("the ext_proc process did not start in 60 s")
            port = ours.recv()
            assert child.pid is not None and child.pid != os.getpid()
            print("| scenario | in-process CPU/req | wire p50 | wire p99 | ext_proc process CPU/req |")
            print("|---|---|---|---|---|")
            for name, reqs in scenarios().items():
                cpu = await in_process(servicer, reqs, args.requests)
                p50, p99, wire_cpu = await over_wire(port, child.pid, reqs, args.requests)
                print(f"| {name} | {cpu:.0f} us | {p50:.2f} ms | {p99:.2f} ms | {wire_cpu:.0f} us |")
        finally:
            ours.send("stop")
            child.join(30)
            if child.is_alive():
                child.kill()
                child.join(10)
            await engine.close()
            catalog.close()


if __name__ == "__main__":
    asyncio.run(main())
