"""What to do with one response, and doing it (pure apart from the awaited policy query).

* ``tools/list``, ``prompts/list``, ``resources/list``, ``resources/templates/list``: keep the
  items the caller's policy allows (one query for the whole page) whose pinned definition the
  catalog approves; every other key of the result (``nextCursor`` included) is left alone.
* Any other method, when the policy obligation names PII types: mask them (``gateway.pii``) in
  the result, an error's message and data, and the params of any notification or request the
  server sends in the same SSE stream, and every other string of the result (base64 payloads
  excepted). Without an obligation: nothing to do, the body is not even sent to ext_proc.
* No JSON-RPC method (a GET: the session's standalone stream, or a resumption with
  ``Last-Event-ID`` that replays earlier answers, final results included; DELETE; a client's
  response): the answer to a replayed request carries no method, so each message is decided by
  its shape. A result holding a ``tools`` / ``prompts`` / ``resources`` /
  ``resourceTemplates`` array is filtered as that list (each one present; any other value
  under those names fails closed), and then, with an obligation, the whole message is masked,
  lists included: a replay gets at least the treatment the original answer got.

Inspected bodies are always re-serialized from what was parsed (orjson), so what the client
parses is exactly what was inspected, duplicate keys included.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ext_proc.errors import InvalidUpstreamResponse, ListPolicyError
from ext_proc.metadata import CallerContext
from gateway.catalog import Catalog
from gateway.pii import DEFAULT_REPLACEMENT, Masker, mask_mcp_result
from gateway.policy.errors import PolicyError
from gateway.policy.input import build_list_input
from gateway.sse import DEFAULT_MAX_BUFFER, SseParser, serialize

# The methods whose results clients read as MCP content; with an obligation any answer is masked.
MASK_METHODS = frozenset({"tools/call", "resources/read", "prompts/get"})


@dataclass(frozen=True, slots=True)
class ListSpec:
    method: str
    key: str  # the list in the result
    id_field: str  # what names an item (for the policy and the catalog)
    catalog_kind: str | None  # resource templates are not pinned by the catalog


LIST_SPECS: Mapping[str, ListSpec] = {
    s.method: s for s in (
        ListSpec("tools/list", "tools", "name", "tool"),
        ListSpec("prompts/list", "prompts", "name", "prompt"),
        ListSpec("resources/list", "resources", "uri", "resource"),
        ListSpec("resources/templates/list", "resourceTemplates", "uriTemplate", None),
    )
}
# Result key -> list kind, for answers whose request method is unknown (replayed on a GET stream).
LIST_KEYS: Mapping[str, ListSpec] = {s.key: s for s in LIST_SPECS.values()}


class ListPolicy(Protocol):
    """The part of ``gateway.policy.PolicyEngine`` used here."""

    async def query(self, entrypoint: str, policy_input: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """``masker`` set: mask; ``list_spec`` set: filter; ``by_shape``: filter every list-shaped
    result (then mask, with a masker); none of them: pass the body untouched."""

    masker: Masker | None = None
    list_spec: ListSpec | None = None
    by_shape: bool = False

    @property
    def inspects(self) -> bool:
        return self.masker is not None or self.list_spec is not None or self.by_shape

    @property
    def filters(self) -> bool:
        return self.list_spec is not None or self.by_shape


NOTHING = Plan()


@functools.lru_cache(maxsize=64)
def masker_for(types: tuple[str, ...], replacement: str = DEFAULT_REPLACEMENT,
               phone_region: str = "US") -> Masker:
    """One compiled masker per type set (the caller passes canonical, sorted type tuples)."""
    return Masker(types, replacement=replacement, phone_region=phone_region)


def mask_message(msg: dict[str, Any], masker: Masker) -> tuple[dict[str, Any], Counter[str]]:
    """Mask one JSON-RPC message from a server: result as MCP content, error, and params."""
    counts: Counter[str] = Counter()
    out = dict(msg)
    if "result" in out:
        out["result"], c = mask_mcp_result(out["result"], masker)
        counts.update(c)
    if "error" in out:
        out["error"], c = masker.mask_json(out["error"])
        counts.update(c)
    if "params" in out:
        out["params"], c = masker.mask_json(out["params"])
        counts.update(c)
    return out, counts


# Base64 payloads: a text blob is decoded and masked by mask_mcp_result; binary ones are never
# scanned as text (random base64 matches the phone and IBAN patterns now and then).
_MEDIA_TYPES = frozenset({"image", "audio"})


def mask_everywhere(msg: dict[str, Any], masker: Masker) -> tuple[dict[str, Any], Counter[str]]:
    """Mask a message: as :func:`mask_message`, then every other string of the result too.

    MCP-aware masking looks only at the content fields of the shapes it knows (a result's
    ``_meta``, a block's annotations, keys next to ``content`` pass it), and a replayed message
    may combine shapes (a list next to content). The second pass costs ~20% on a 16 KB answer
    full of PII (2.96 -> 3.55 ms here).
    """
    out, counts = mask_message(msg, masker)
    if isinstance(out.get("result"), (dict, list)):
        out["result"], more = masker.mask_json(out["result"], skip=_binary_keys)
        counts.update(more)
    return out, counts


def _binary_keys(obj: dict[str, Any]) -> frozenset[str]:
    # Base64 payloads are not text: a blob anywhere, the data of an image or audio block.
    return _MEDIA_KEYS if obj.get("type") in _MEDIA_TYPES else _BLOB_KEYS


_BLOB_KEYS = frozenset({"blob"})
_MEDIA_KEYS = frozenset({"blob", "data"})


class Inspector:
    """Decides per response and transforms parsed JSON-RPC messages. One per process."""

    def __init__(self, *, policy: ListPolicy | None, list_entrypoints: Mapping[str, str],
                 catalog: Catalog | None, replacement: str = DEFAULT_REPLACEMENT,
                 phone_region: str = "US") -> None:
        unknown = set(list_entrypoints) - {s.key for s in LIST_SPECS.values()}
        if unknown:
            raise ValueError(f"list entrypoints for unknown list kinds: {', '.join(sorted(unknown))}")
        if list_entrypoints and policy is None:
            raise ValueError("list entrypoints are configured but there is no policy engine")
        self._policy = policy
        self._entrypoints = dict(list_entrypoints)
        self._catalog = catalog
        self._replacement = replacement
        self._region = phone_region

    def plan(self, ctx: CallerContext) -> Plan:
        method = ctx.mcp_method
        if method is None:
            # Nothing in the request says what the answer holds (a GET stream replays answers to
            # any earlier request of the session): decide per message, never pass it unseen.
            return Plan(masker=self._masker(ctx), by_shape=True)
        spec = LIST_SPECS.get(method)
        if spec is not None:
            return Plan(list_spec=spec)
        if ctx.mask:
            # Any answer can carry PII (a completion, a log notification on the same stream).
            return Plan(masker=self._masker(ctx))
        return NOTHING

    def _masker(self, ctx: CallerContext) -> Masker | None:
        return masker_for(ctx.mask, self._replacement, self._region) if ctx.mask else None

    async def transform(self, msg: Any, ctx: CallerContext, plan: Plan
                        ) -> tuple[dict[str, Any], Counter[str]]:
        """The inspected message and the masked counts; raises InspectionError subclasses."""
        if not isinstance(msg, dict):
            raise InvalidUpstreamResponse("the upstream answer is not a JSON-RPC message object")
        if plan.list_spec is not None:
            return await self.filter_list(msg, ctx, plan.list_spec), Counter()
        if plan.by_shape:
            for spec in listed_kinds(msg):
                msg = await self.filter_list(msg, ctx, spec)
        if plan.masker is not None:
            return mask_everywhere(msg, plan.masker)
        return msg, Counter()

    async def filter_list(self, msg: dict[str, Any], ctx: CallerContext, spec: ListSpec
                          ) -> dict[str, Any]:
        result = msg.get("result")
        if result is None:
            return msg  # an error answer, a notification or a server request: nothing is listed
        if not isinstance(result, dict) or not isinstance(result.get(spec.key), list):
            raise InvalidUpstreamResponse(f"a {spec.method} result without a {spec.key!r} list")
        # Items that cannot be named cannot be decided on: they are dropped.
        items: list[Mapping[str, Any]] = [
            i for i in result[spec.key] if isinstance(i, dict) and isinstance(i.get(spec.id_field), str)]
        if self._catalog is not None and spec.catalog_kind is not None and items:
            items = self._catalog.visible(ctx.server, items, kind=spec.catalog_kind)
        entrypoint = self._entrypoints.get(spec.key)
        if entrypoint is not None and items:
            allowed = await self._allowed(entrypoint, ctx, spec, [i[spec.id_field] for i in items])
            items = [i for i in items if i[spec.id_field] in allowed]
        out = dict(msg)
        out["result"] = {**result, spec.key: items}
        return out

    async def _allowed(self, entrypoint: str, ctx: CallerContext, spec: ListSpec,
                       names: list[str]) -> frozenset[str]:
        assert self._policy is not None
        # The one builder ext_authz's decision used: the same token, server and clock shape.
        policy_input = build_list_input(
            caller=ctx.caller, server_name=ctx.server, server_resource=ctx.resource or "",
            method=spec.method, kind=spec.key, items=names)
        try:
            value = await self._policy.query(entrypoint, policy_input)
        except PolicyError as exc:
            raise ListPolicyError(f"the list policy {entrypoint} failed: {exc}") from None
        if value is None:
            return frozenset()  # undefined rule: nothing is visible
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise ListPolicyError(f"the list policy {entrypoint} must return a list of names, "
                                  f"got {type(value).__name__}")
        return frozenset(value)


def listed_kinds(msg: dict[str, Any]) -> list[ListSpec]:
    """The list kinds a message's result holds, by key (a replayed answer has no method).

    A value other than an array under one of those names fails closed: no client reads it as a
    list, but it cannot be filtered either.
    """
    result = msg.get("result")
    if not isinstance(result, dict):
        return []
    specs = [spec for key, spec in LIST_KEYS.items() if key in result]
    for spec in specs:
        if not isinstance(result[spec.key], list):
            raise InvalidUpstreamResponse(f"a result whose {spec.key!r} is not a list")
    return specs


def listed_count(msg: Any) -> int:
    """How many list items a message's result holds, over every list kind."""
    result = msg.get("result") if isinstance(msg, dict) else None
    if not isinstance(result, dict):
        return 0
    return sum(len(v) for key in LIST_KEYS if isinstance(v := result.get(key), list))


def loads_response(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidUpstreamResponse(f"the upstream answer is not valid JSON: {exc}") from None


MessageTransform = Callable[[Any], Awaitable[dict[str, Any]]]


class SseInspector:
    """Streams ``text/event-stream`` through a per-message transform, event by event.

    Complete events are parsed, transformed and re-serialized as soon as their blank line
    arrives; the incomplete tail stays buffered (bounded). An event still unterminated when the
    stream ends is dropped, as every SSE client drops it: emitting it with a terminator would
    make the client act on an event the server never finished.
    """

    def __init__(self, transform: MessageTransform, *, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self._parser = SseParser(max_buffer=max_buffer)
        self._transform = transform
        self.dropped_tail = False

    async def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for event in self._parser.feed(chunk):
            if event.data is not None and event.data.strip():
                msg = await self._transform(loads_response(event.data.encode("utf-8")))
                event.data = orjson.dumps(msg).decode("utf-8")
            out += serialize(event)
        return bytes(out)

    def close(self) -> None:
        self.dropped_tail = self._parser.close() is not None
