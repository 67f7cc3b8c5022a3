"""ext_proc benchmark (not a test): CPU per inspected response and the latency ext_proc adds.

    .venv/bin/python bench/bench_ext_proc.py [--requests N] [--rounds R] [--concurrency C]

Scenarios: the echo workload's answer (a 1 KB ``tools/call`` result without PII, the masker
still scans it), a 10 KB ``tools/call`` result with PII (``bench.payloads.report_text``) masked
as JSON and as SSE (email, phone, card, iban, ssn), and a 40-tool ``tools/list`` filtered by the
real embedded Rego policy (``policies/``, one ``visible_tools`` query) plus the pinned catalog.
Each runs as the rendered Envoy config sends it (2 messages: response headers carrying the
caller context, then the body) and, for comparison, with request headers sent too (3 messages,
the caller context on the first).

1. In-process: ``time.process_time`` per full Process exchange driven straight into the
   servicer: the Python cost without gRPC.
2. Over the wire: the real grpc.aio server (``ext_proc.app.start_service`` on uvloop, as
   ``python -m ext_proc`` runs it) in its own process on loopback and a grpc.aio client in this
   one, one exchange at a time (``--concurrency``: that many at once): p50/p99 of the exchange
   (what Envoy waits for) and the server process's CPU per exchange (from /proc: what an ext_proc
   instance spends per request).
3. The same over a sync ``grpc.server`` (ThreadPoolExecutor, a stream holds a worker) in a
   second process: ``SyncServicer`` below runs the servicer's own ``Exchange`` and
   ``Processing`` (inspection, spans, metrics, fail-closed answers); masking runs on the stream's
   thread, a list's policy query on the process's event loop (where the engine lives). Only
   the gRPC server differs. The two servers take turns, ``--rounds`` times per scenario in
   alternating order, each round ``--requests / --rounds`` exchanges; CPU is the total over the
   rounds, so the ratio compares like with like on a shared machine.
Prints a markdown table; "sync/aio" is the ratio of CPU per exchange (below 1: sync is cheaper).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry.trace import Span  # noqa: E402

from bench.payloads import echo_arguments, report_text  # noqa: E402
from bench.procs import cpu_seconds  # noqa: E402
from ext_proc.app import start_service  # noqa: E402
from ext_proc.errors import InspectionError, InspectionTimeout  # noqa: E402
from ext_proc.inspect import Inspector  # noqa: E402
from ext_proc.metadata import NAMESPACE  # noqa: E402
from ext_proc.servicer import (  # noqa: E402
    ATTRIBUTES_NAMESPACE,
    REQUEST_ID_ATTRIBUTE,
    TRACEPARENT_ATTRIBUTE,
    Exchange,
    ExternalProcessorServicer,
    _end_span,
    _enter,
    _leave,
    _rebind,
    grpc_trace_headers,
    http_method,
    request_ids,
)
from ext_proc.settings import Settings  # noqa: E402
from gateway import eventloop  # noqa: E402
from gateway.catalog import Catalog  # noqa: E402
from gateway.config import Instance, PolicyConfig  # noqa: E402
from gateway.errors import GatewayError  # noqa: E402
from gateway.policy.factory import build_engine  # noqa: E402
from gateway.telemetry import metrics  # noqa: E402

logger = logging.getLogger(__name__)
T = TypeVar("T")
SYNC_WORKERS = 16
SERVERS = ("aio", "sync")

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
                     n: int) -> tuple[float, pb.ProcessingResponse]:
    """CPU per exchange in us, and the exchange's last answer (what each server must send)."""
    for _ in range(20):  # warm caches (masker, validators, policy bundle)
        [r async for r in servicer.process(_iter(reqs), None)]
    start = time.process_time()
    for _ in range(n):
        out = [r async for r in servicer.process(_iter(reqs), None)]
    cpu = (time.process_time() - start) / n
    assert out[-1].WhichOneof("response") == "response_body", out[-1]
    return cpu * 1e6, out[-1]


class SyncServicer(ExternalProcessorServicer):
    """The servicer's exchange on a sync grpcio server (the prototype measured against grpc.aio).

    ``ExternalProcessorServicer.process`` / ``_step`` with the request iterator and ``yield`` in
    place of ``context.read()`` / ``context.write()``; ``Exchange`` (inspection), spans, metrics
    and the fail-closed answer are the servicer's own. A body that needs no policy query is
    inspected on the stream's thread (the coroutine never suspends: masking waits for nothing);
    a list's query goes to ``loop``, where the engine's worker pool lives, bounded by the
    message timeout. A stream Envoy resets ends in ``grpc.RpcError`` from the iterator.
    """

    def __init__(self, settings: Settings, inspector: Inspector,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(settings, inspector)
        self._loop = loop

    def Process(self, request_iterator: Iterator[pb.ProcessingRequest],  # type: ignore[override]  # sync server
                context: Any) -> Iterator[pb.ProcessingResponse]:
        exchange = Exchange(self._inspector, self._settings)
        span: Span | None = None
        first = True
        try:
            for req in request_iterator:
                if first:
                    first = False
                    trace_headers, exchange.request_id = request_ids(req)
                    exchange.http_method = http_method(req)
                    span = self._start_span(grpc_trace_headers(context) or trace_headers)
                resp, done = self._sync_step(exchange, req, span)
                yield resp
                if done:
                    return
        except grpc.RpcError:  # Envoy reset the stream
            exchange.cancelled = True
        except GeneratorExit:  # grpcio dropped the stream after a failed send
            exchange.cancelled = True
            raise
        finally:
            if not first:
                metrics.EXT_PROC_STREAMS.labels(exchange.outcome()).inc()
            if span is not None:
                _end_span(span, exchange)

    def _sync_step(self, exchange: Exchange, req: pb.ProcessingRequest, span: Span | None
                   ) -> tuple[pb.ProcessingResponse, bool]:
        known = exchange.ctx is not None
        tokens = _enter(exchange, span)
        try:
            try:
                if req.WhichOneof("request") != "response_body":
                    return exchange.answer(req), exchange.complete
                started = time.perf_counter()
                try:
                    return self._body(exchange, req), exchange.complete
                finally:
                    metrics.EXT_PROC_BODY_LATENCY.observe(time.perf_counter() - started)
            except GatewayError as err:
                failure = err
            except TimeoutError:
                failure = InspectionTimeout("inspection took longer than the message timeout")
            except Exception:  # top-level handler: whatever broke, the answer is withheld
                known = _rebind(exchange, known)
                logger.exception("ext_proc failed; withholding the answer")
                failure = InspectionError("internal error in response inspection")
            _rebind(exchange, known)
            return self._fail(exchange, failure), True
        finally:
            _leave(tokens)

    def _body(self, exchange: Exchange, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        handling = exchange.handle(req)
        if not exchange.plan.filters:
            return run_inline(handling)
        future = asyncio.run_coroutine_threadsafe(handling, self._loop)
        try:
            return future.result(self._settings.message_timeout_seconds)
        except TimeoutError:
            future.cancel()
            raise


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end on this thread, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()
    raise InspectionError("the inspection waited for something outside an event loop")


class Wire:
    """Exchanges against one server process, in rounds: latencies and CPU add up across them."""

    def __init__(self, port: int, pid: int) -> None:
        self.port = port
        self.pid = pid
        self.latencies: list[float] = []
        self.cpu = 0.0
        self.exchanges = 0

    async def round(self, reqs: list[pb.ProcessingRequest], n: int, concurrency: int,
                    expected: pb.ProcessingResponse) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)

            async def one(record: bool) -> None:
                started = time.perf_counter()
                call = stub.Process(timeout=10)
                for req in reqs:
                    await call.write(req)
                    resp = await call.read()
                    assert resp.WhichOneof("response") != "immediate_response", resp
                assert resp == expected, "the server's answer differs from the servicer's"
                await call.done_writing()
                if record:
                    self.latencies.append(time.perf_counter() - started)

            async def worker(count: int, record: bool) -> None:
                for _ in range(count):
                    await one(record)

            await asyncio.gather(*(worker(5, False) for _ in range(concurrency)))
            per = max(1, n // concurrency)
            cpu0 = cpu_seconds(self.pid)
            await asyncio.gather(*(worker(per, True) for _ in range(concurrency)))
            cpu1 = cpu_seconds(self.pid)
        assert cpu0 is not None and cpu1 is not None, "an ext_proc process died"
        self.cpu += cpu1 - cpu0
        self.exchanges += per * concurrency

    def figures(self) -> tuple[float, float, float]:
        """p50 and p99 in ms, CPU per exchange in us."""
        lat = sorted(self.latencies)
        return (statistics.median(lat) * 1e3, lat[max(0, int(len(lat) * 0.99) - 1)] * 1e3,
                self.cpu / self.exchanges * 1e6)


ENTRY = "mcp/authz/visible_tools"


def build(catalog_path: Path) -> tuple[Settings, Any, Catalog]:
    engine = build_engine(PolicyConfig(dir=str(ROOT / "policies")), extra_entrypoints=(ENTRY,))
    catalog = Catalog(catalog_path)
    catalog.refresh("files", TOOLS)
    settings = Settings(listen=Instance("127.0.0.1", 0), policy=PolicyConfig(),
                        catalog_path=None, message_timeout_seconds=5.0)
    return settings, engine, catalog


def serve(conn: multiprocessing.connection.Connection, catalog_path: Path, server: str) -> None:
    """The child process: one ext_proc server on port 0 (``aio``: the real service; ``sync``:
    ``SyncServicer`` on a sync grpc.server); sends the port, stops on a message."""
    async def run() -> None:
        settings, engine, catalog = build(catalog_path)
        loop = asyncio.get_running_loop()
        if server == "aio":
            service = await start_service(settings, engine, catalog=catalog)
            conn.send(service.port)
            await loop.run_in_executor(None, conn.recv)
            await service.stop(grace=None)
            return
        await engine.start()
        servicer = SyncServicer(settings, Inspector(
            policy=engine, list_entrypoints={"tools": ENTRY}, catalog=catalog), loop)
        sync = grpc.server(ThreadPoolExecutor(max_workers=SYNC_WORKERS),
                           options=[("grpc.so_reuseport", 0)],
                           maximum_concurrent_rpcs=SYNC_WORKERS)
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, sync)
        port = sync.add_insecure_port("127.0.0.1:0")
        sync.start()
        try:
            conn.send(port)
            await loop.run_in_executor(None, conn.recv)
        finally:
            await asyncio.to_thread(sync.stop(None).wait, 10)
            await engine.close()
            catalog.close()

    eventloop.run(run())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500,
                        help="exchanges per scenario and server, split over the rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings, engine, catalog = build(Path(tmp) / "catalog.sqlite")
        await engine.start()
        servicer = ExternalProcessorServicer(settings, Inspector(
            policy=engine, list_entrypoints={"tools": ENTRY}, catalog=catalog))
        spawn = multiprocessing.get_context("spawn")
        children: dict[str, tuple[multiprocessing.connection.Connection, Any]] = {}
        try:
            wires: dict[str, Wire] = {}
            for server in SERVERS:
                ours, theirs = multiprocessing.Pipe()
                child = spawn.Process(target=serve, daemon=True,
                                      args=(theirs, Path(tmp) / f"{server}.sqlite", server))
                child.start()
                children[server] = (ours, child)
            for server, (ours, child) in children.items():
                if not ours.poll(60):
                    raise SystemExit(f"the {server} ext_proc process did not start in 60 s")
                assert child.pid is not None and child.pid != os.getpid()
                wires[server] = Wire(ours.recv(), child.pid)
            per_round = max(1, args.requests // args.rounds)
            print(f"grpc.aio (uvloop) against sync grpc.server ({SYNC_WORKERS} workers), "
                  f"{args.rounds} alternating rounds of {per_round} exchanges each, "
                  f"{args.concurrency} at a time")
            print()
            print("| scenario | in-process CPU/req | aio p50 | sync p50 | aio p99 | sync p99 | "
                  "aio CPU/req | sync CPU/req | sync/aio CPU |")
            print("|---|---|---|---|---|---|---|---|---|")
            for name, reqs in scenarios().items():
                cpu, expected = await in_process(servicer, reqs, args.requests)
                runs = {server: Wire(w.port, w.pid) for server, w in wires.items()}
                for r in range(args.rounds):
                    for server in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
                        await runs[server].round(reqs, per_round, args.concurrency, expected)
                (ap50, ap99, acpu), (sp50, sp99, scpu) = (runs[s].figures() for s in SERVERS)
                print(f"| {name} | {cpu:.0f} us | {ap50:.2f} ms | {sp50:.2f} ms | {ap99:.2f} ms | "
                      f"{sp99:.2f} ms | {acpu:.0f} us | {scpu:.0f} us | "
                      f"{scpu / acpu if acpu else float('nan'):.2f} |", flush=True)
        finally:
            for ours, _ in children.values():
                ours.send("stop")
            for _, child in children.values():
                child.join(30)
                if child.is_alive():
                    child.kill()
                    child.join(10)
            await engine.close()
            catalog.close()


if __name__ == "__main__":
    asyncio.run(main())
