"""ext_proc benchmark (not a test): CPU per inspected response and the latency ext_proc adds.

    .venv/bin/python bench/bench_ext_proc.py [--requests N]

Scenarios: a 10 KB ``tools/call`` result with PII (``bench.payloads.report_text``) masked as JSON
and as SSE (email, phone, card, iban, ssn), and a 40-tool ``tools/list`` filtered by the real
embedded Rego policy (``policies/``, one ``visible_tools`` query) plus the pinned catalog.

1. In-process: ``time.process_time`` per full Process exchange (request headers, response
   headers, body) driven straight into the servicer: the Python cost without gRPC.
2. Over the wire: the real grpc.aio server on loopback and a grpc.aio client in this process,
   one exchange at a time: p50/p99 of the exchange (what Envoy waits for) and CPU per exchange
   (client + server, so an upper bound of the server's share).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench.payloads import report_text  # noqa: E402
from ext_proc.app import start_service  # noqa: E402
from ext_proc.inspect import Inspector  # noqa: E402
from ext_proc.metadata import NAMESPACE  # noqa: E402
from ext_proc.servicer import ExternalProcessorServicer  # noqa: E402
from ext_proc.settings import Settings  # noqa: E402
from gateway.catalog import Catalog  # noqa: E402
from gateway.config import Instance, PolicyConfig  # noqa: E402
from gateway.policy import build_engine  # noqa: E402

MASK = ["email", "phone", "card", "iban", "ssn"]
TOOLS = [{"name": n, "description": f"tool {n}", "inputSchema": {"type": "object"}}
         for n in ("list_directory", "stat", "read_file", "search", "write_file",
                   *(f"extra_{i}" for i in range(35)))]


def meta(method: str) -> dict[str, Any]:
    return {"mcp_method": method, "server": "files", "tool": "read_file", "sub": "alice",
            "tenant": "acme", "roles": ["viewer"], "scope": "tools:call:files/*", "mask": MASK,
            "decision_id": "bench", "request_id": "bench"}


def exchange(method: str, content_type: str, body: bytes) -> list[pb.ProcessingRequest]:
    first = pb.ProcessingRequest()
    first.request_headers.headers.headers.add(key=":path", raw_value=b"/mcp/files")
    first.metadata_context.filter_metadata[NAMESPACE].update(meta(method))
    headers = pb.ProcessingRequest()
    headers.response_headers.headers.headers.add(key=":status", raw_value=b"200")
    headers.response_headers.headers.headers.add(key="content-type", raw_value=content_type.encode())
    chunk = pb.ProcessingRequest()
    chunk.response_body.body = body
    chunk.response_body.end_of_stream = True
    return [first, headers, chunk]


def scenarios() -> dict[str, list[pb.ProcessingRequest]]:
    result = {"content": [{"type": "text", "text": report_text()}], "isError": False}
    msg = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": result})
    listing = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS}})
    return {
        "tools/call 10 KB masked, JSON": exchange("tools/call", "application/json", msg),
        "tools/call 10 KB masked, SSE": exchange("tools/call", "text/event-stream",
                                                 b"data: " + msg + b"\n\n"),
        "tools/list 40 tools filtered (Rego + catalog)": exchange("tools/list", "application/json",
                                                                 listing),
    }


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


async def over_wire(port: int, reqs: list[pb.ProcessingRequest], n: int) -> tuple[float, float, float]:
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
        cpu0 = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            await one()
            lat.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu0) / n
    lat.sort()
    return statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99) - 1] * 1e3, cpu * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    entry = "mcp/authz/visible_tools"
    engine = build_engine(PolicyConfig(dir=str(ROOT / "policies")), extra_entrypoints=(entry,))
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog(Path(tmp) / "catalog.sqlite")
        catalog.refresh("files", TOOLS)
        settings = Settings(listen=Instance("127.0.0.1", 0), policy=PolicyConfig(),
                            catalog_path=None, message_timeout_seconds=5.0)
        service = await start_service(settings, engine, catalog=catalog)
        servicer = ExternalProcessorServicer(settings, Inspector(
            policy=engine, list_entrypoints={"tools": entry}, catalog=catalog))
        try:
            print("| scenario | in-process CPU/req | wire p50 | wire p99 | wire CPU/req (client+server) |")
            print("|---|---|---|---|---|")
            for name, reqs in scenarios().items():
                cpu = await in_process(servicer, reqs, args.requests)
                p50, p99, wire_cpu = await over_wire(service.port, reqs, args.requests)
                print(f"| {name} | {cpu:.0f} us | {p50:.2f} ms | {p99:.2f} ms | {wire_cpu:.0f} us |")
        finally:
            await service.stop(grace=None)


if __name__ == "__main__":
    asyncio.run(main())
