"""Shared helpers: ProcessingRequest builders, a stand-in list policy, settings and payloads.

The stand-in policy answers the same contract as H4's ``visible_tools`` rule (a list of the
allowed names, one query per page); the real engine is exercised in the e2e test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc.inspect import Inspector
from ext_proc.metadata import NAMESPACE
from ext_proc.servicer import (
    ATTRIBUTES_NAMESPACE,
    METHOD_ATTRIBUTE,
    REQUEST_ID_ATTRIBUTE,
    TRACEPARENT_ATTRIBUTE,
    ExternalProcessorServicer,
)
from ext_proc.settings import Settings
from gateway.catalog import Catalog
from gateway.config import Instance, PolicyConfig

EMAIL = "alice.smith@example.com"
CARD = "4111 1111 1111 1111"
TOOLS = [
    {"name": "read_file", "description": "Read a file", "inputSchema": {"type": "object"}},
    {"name": "write_file", "description": "Write a file", "inputSchema": {"type": "object"}},
    {"name": "stat", "description": "Stat a path", "inputSchema": {"type": "object"}},
]


def caller(**overrides: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"mcp_method": "tools/call", "server": "files", "tool": "read_file",
                            "sub": "alice", "tenant": "acme", "roles": ["viewer"],
                            "mask": ["email", "card"], "decision_id": "d-1", "request_id": "r-1"}
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not ...}


def with_metadata(req: pb.ProcessingRequest, meta: Mapping[str, Any] | None) -> pb.ProcessingRequest:
    if meta is not None:
        req.metadata_context.filter_metadata[NAMESPACE].update(dict(meta))
    return req


def request_headers(meta: Mapping[str, Any] | None = None, method: str = "POST"
                    ) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    for key, value in ((":method", method), (":path", "/mcp/files"), ("content-type", "application/json")):
        h = req.request_headers.headers.headers.add()
        h.key, h.raw_value = key, value.encode()
    return with_metadata(req, meta)


def response_headers(content_type: str | None = "application/json", *, end_of_stream: bool = False,
                     extra: Iterable[tuple[str, str]] = (),
                     meta: Mapping[str, Any] | None = None) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    pairs = [(":status", "200"), ("content-length", "123")]
    if content_type is not None:
        pairs.append(("content-type", content_type))
    for key, value in [*pairs, *extra]:
        h = req.response_headers.headers.headers.add()
        h.key, h.raw_value = key, value.encode()
    req.response_headers.end_of_stream = end_of_stream
    return with_metadata(req, meta)


def with_attributes(req: pb.ProcessingRequest, *, request_id: str | None = None,
                    traceparent: str | None = None, method: str | None = None
                    ) -> pb.ProcessingRequest:
    """What Envoy's ``response_attributes`` add to the response-headers message."""
    attrs = req.attributes[ATTRIBUTES_NAMESPACE]
    for name, value in ((REQUEST_ID_ATTRIBUTE, request_id), (TRACEPARENT_ATTRIBUTE, traceparent),
                        (METHOD_ATTRIBUTE, method)):
        if value is not None:
            attrs.fields[name].string_value = value
    return req


def response_body(body: bytes, *, end_of_stream: bool = True) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    req.response_body.body = body
    req.response_body.end_of_stream = end_of_stream
    return req


def jsonrpc_result(result: Any, rid: int = 1) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": result})


def tool_result(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "structuredContent": {"note": text},
            "isError": False}


def sse_event(payload: bytes, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n".encode() if event_id else b""
    return head + b"event: message\ndata: " + payload + b"\n\n"


@dataclass
class StandinPolicy:
    """Allows the names in ``allowed``; records every query; optional failure modes."""

    allowed: set[str] = field(default_factory=lambda: {"read_file", "stat"})
    queries: list[tuple[str, Any]] = field(default_factory=list)
    answer: Any = ...  # overrides the computed answer when set
    hang: bool = False
    started: bool = False
    closed: bool = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def query(self, entrypoint: str, policy_input: Any) -> Any:
        self.queries.append((entrypoint, policy_input))
        if self.hang:
            await asyncio.Event().wait()
        if self.answer is not ...:
            return self.answer
        return sorted(n for n in policy_input["items"] if n in self.allowed)


def make_settings(**kw: Any) -> Settings:
    args: dict[str, Any] = {"listen": Instance("127.0.0.1", 0), "policy": PolicyConfig(),
                            "catalog_path": None, "message_timeout_seconds": 2.0}
    args.update(kw)
    return Settings(**args)


@pytest.fixture
def policy() -> StandinPolicy:
    return StandinPolicy()


@pytest.fixture
def catalog(tmp_path: Path) -> Iterable[Catalog]:
    with Catalog(tmp_path / "catalog.sqlite") as cat:
        cat.refresh("files", TOOLS)
        yield cat


def make_servicer(policy: StandinPolicy | None, catalog: Catalog | None = None,
                  **settings: Any) -> ExternalProcessorServicer:
    s = make_settings(**settings)
    inspector = Inspector(policy=policy, list_entrypoints=s.list_entrypoints if policy else {},
                          catalog=catalog)
    return ExternalProcessorServicer(s, inspector)


async def _iterate(items: list[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingRequest]:
    for item in items:
        yield item


async def run(servicer: ExternalProcessorServicer, *requests: pb.ProcessingRequest
              ) -> list[pb.ProcessingResponse]:
    """Drive one Process stream in-process; every answer, in order."""
    return [r async for r in servicer.process(_iterate(list(requests)), None)]
