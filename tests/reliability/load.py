"""Bounded load through the gateway: a fixed number of tools/call requests, a fixed concurrency,
each with a unique id, recording when it started and how it ended."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2

from tests.reliability.stack import Gateway, call_body, call_headers

REQUEST_TIMEOUT = 20.0


@dataclass
class Outcome:
    call_id: str
    started: float  # time.monotonic() when the request was sent
    status: int  # HTTP status; 0 when the client saw no answer at all
    body: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body is not None and "result" in self.body \
            and not self.body["result"].get("isError", False)


def client(gw: Gateway) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(verify=gw.tls(), timeout=REQUEST_TIMEOUT,
                              limits=httpx2.Limits(max_connections=32))


async def call(http: httpx2.AsyncClient, gw: Gateway, bearer: str, tool: str,
               arguments: dict[str, Any], call_id: str, server: str = "counter") -> Outcome:
    started = time.monotonic()
    try:
        reply = await http.post(gw.url(server), content=json.dumps(call_body(tool, arguments, call_id)),
                                headers=call_headers(bearer, tool))
    except httpx2.TransportError:
        return Outcome(call_id, started, 0, None)
    try:
        body = reply.json()
    except ValueError:
        body = None
    return Outcome(call_id, started, reply.status_code, body if isinstance(body, dict) else None)


async def run(gw: Gateway, bearer: str, prefix: str, count: int, concurrency: int,
              during: Callable[[int], Awaitable[None]] | None = None,
              tool: str = "bump") -> list[Outcome]:
    """``count`` calls of ``tool`` (ids ``<prefix>-<n>``), ``concurrency`` at a time. ``during(n)``
    is awaited by the worker that has just finished call number n (a hook to inject a fault
    mid-run; the other workers keep going)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)
    out: list[Outcome] = []

    async def worker(http: httpx2.AsyncClient) -> None:
        while True:
            try:
                n = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            out.append(await call(http, gw, bearer, tool, {"id": f"{prefix}-{n}"},
                                  f"{prefix}-{n}"))
            if during is not None:
                await during(len(out))

    async with client(gw) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return out
