"""OpenAPI 3.0/3.1 -> MCP tool definitions, and tool arguments -> an HTTP request.

Pure translation: no I/O except :func:`load_document`. Every operation becomes an
:class:`Operation` that knows both its MCP face (name, schemas, annotations) and how to turn the
validated tool arguments back into path, query, headers and JSON body.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch")
MAX_REF_DEPTH = 32
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
TOOL_NAME_MAX = 128
_TOOL_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
# Headers a tool argument may never set: credentials belong to the connector, framing to aiohttp.
RESERVED_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "host", "content-length", "content-type",
    "transfer-encoding", "connection", "x-api-key", "forwarded", "x-forwarded-for",
})
_ANNOTATIONS: dict[str, dict[str, bool]] = {
    "GET": {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True},
    "HEAD": {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True},
    "OPTIONS": {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True},
    "PUT": {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True},
    "DELETE": {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True},
    "PATCH": {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": False},
    "POST": {"readOnlyHint": False, "destructiveHint": False, "idempotentHint": False},
}
_ANNOTATION_KEYS = frozenset({"readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"})
# OpenAPI-only keywords that mean nothing (or something else) to a JSON Schema validator.
_DROP_KEYWORDS = frozenset({"nullable", "discriminator", "xml", "externalDocs", "example"})


class OpenAPIError(ValueError):
    """The document cannot be used; the message says what to fix."""


class BadArguments(ValueError):
    """Tool arguments that passed the schema still cannot form a safe request."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    arg: str
    location: str  # path | query | header
    required: bool
    json_encoded: bool = False  # parameter declared with `content` instead of `schema`


@dataclass(frozen=True)
class Operation:
    operation_id: str
    tool_name: str
    method: str
    path: str
    title: str | None
    description: str
    params: tuple[ParamSpec, ...]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    annotations: dict[str, bool]
    body_arg: str | None = None  # body nested under this argument
    body_props: tuple[str, ...] = ()  # body flattened: these arguments form it
    has_body: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: dict[str, str]
    json_body: Any
    has_body: bool


def load_document(source: str, timeout: float = 10.0) -> dict[str, Any]:
    """Read an OpenAPI document (JSON or YAML) from a file path or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        # Scheme checked just above, so file: and custom schemes cannot reach urlopen.
        req = urllib.request.Request(source, headers={"Accept": "application/json, application/yaml"})  # noqa: S310
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read(MAX_DOCUMENT_BYTES + 1)
    else:
        raw = Path(source).read_bytes()
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise OpenAPIError(f"OpenAPI document {source} is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise OpenAPIError(f"{source} is neither JSON nor YAML: {e}") from None
    return check_document(doc, source)


def check_document(doc: Any, source: str = "document") -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise OpenAPIError(f"{source}: an OpenAPI document must be an object")
    if "swagger" in doc:
        raise OpenAPIError(f"{source}: OpenAPI 2 (Swagger) is not supported; convert it to OpenAPI 3")
    version = doc.get("openapi")
    if not isinstance(version, str) or not re.match(r"^3\.[01]\.", version):
        raise OpenAPIError(f"{source}: unsupported openapi version {version!r}; need 3.0.x or 3.1.x")
    if not isinstance(doc.get("paths", {}), dict):
        raise OpenAPIError(f"{source}: 'paths' must be an object")
    return doc


def server_url(doc: dict[str, Any], source: str) -> str | None:
    """The first ``servers`` URL, made absolute against the document's own URL."""
    servers = doc.get("servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], dict):
        return None
    url = servers[0].get("url")
    if not isinstance(url, str) or "{" in url:
        return None
    if source.startswith(("http://", "https://")):
        return urllib.parse.urljoin(source, url)
    return url if url.startswith(("http://", "https://")) else None


def sanitize_tool_name(raw: str) -> str:
    name = _TOOL_NAME_BAD.sub("_", raw).strip("_") or "operation"
    return name[:TOOL_NAME_MAX]


class _Resolver:
    """Inlines local ``$ref``s; cycles and over-deep nesting become permissive ``{}`` schemas."""

    def __init__(self, doc: dict[str, Any], openapi30: bool) -> None:
        self.doc = doc
        self.openapi30 = openapi30

    def lookup(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise OpenAPIError(f"external $ref {ref!r} is not supported; bundle the document first")
        node: Any = self.doc
        for part in ref[1:].split("/")[1:]:
            key = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                raise OpenAPIError(f"$ref {ref!r} does not resolve")
        return node

    def deref(self, obj: Any) -> Any:
        """Follow a chain of refs on a non-schema object (parameter, requestBody, response)."""
        seen: set[str] = set()
        while isinstance(obj, dict) and isinstance(obj.get("$ref"), str):
            ref = obj["$ref"]
            if ref in seen or len(seen) > MAX_REF_DEPTH:
                raise OpenAPIError(f"$ref cycle at {ref!r}")
            seen.add(ref)
            obj = self.lookup(ref)
        return obj

    def schema(self, node: Any, mode: str, stack: tuple[str, ...] = (), depth: int = 0) -> Any:
        """A JSON Schema for ``node`` with refs inlined; mode is "input" or "output"."""
        if depth > MAX_REF_DEPTH:
            return {"description": "nesting too deep; not described"}
        if isinstance(node, list):
            return [self.schema(x, mode, stack, depth + 1) for x in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in stack:
                return {"description": f"recursive reference to {ref.rsplit('/', 1)[-1]}"}
            target = self.schema(self.lookup(ref), mode, (*stack, ref), depth + 1)
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            if not siblings:
                return target
            return {"allOf": [target], **self.schema(siblings, mode, stack, depth + 1)}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP_KEYWORDS:
                continue
            if key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(value, dict):
                out[key] = {k: self.schema(v, mode, stack, depth + 1) for k, v in value.items()
                            if not _hidden(v, mode)}
            elif isinstance(value, (dict, list)) and key not in ("enum", "const", "default", "examples",
                                                                 "required"):
                out[key] = self.schema(value, mode, stack, depth + 1)
            else:
                out[key] = copy.deepcopy(value)
        if "example" in node and "examples" not in node:
            out["examples"] = [copy.deepcopy(node["example"])]
        if isinstance(out.get("required"), list) and isinstance(node.get("properties"), dict):
            out["required"] = [r for r in out["required"] if r in out.get("properties", {})]
        if self.openapi30:
            _convert_30(node, out)
        return out


def _hidden(prop: Any, mode: str) -> bool:
    if not isinstance(prop, dict):
        return False
    return bool(prop.get("readOnly")) if mode == "input" else bool(prop.get("writeOnly"))


def _convert_30(node: dict[str, Any], out: dict[str, Any]) -> None:
    """OpenAPI 3.0 dialect -> JSON Schema: nullable, boolean exclusive bounds."""
    if node.get("nullable") is True:
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    for excl, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(excl), bool):
            if out[excl] and bound in out:
                out[excl] = out.pop(bound)
            else:
                del out[excl]


def _is_object_schema(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    t = schema.get("type")
    return t == "object" or (t is None and isinstance(schema.get("properties"), dict))


def _json_content(content: Any) -> tuple[str, Any] | None:
    if not isinstance(content, dict):
        return None
    for ctype, media in content.items():
        base = ctype.split(";")[0].strip().lower()
        if base == "application/json" or base.endswith("+json"):
            return ctype, media.get("schema", {}) if isinstance(media, dict) else {}
    return None


def parse_operations(doc: dict[str, Any], *, tool_prefix: str = "") -> list[Operation]:
    """Every operation of the document, in document order; names are unique."""
    resolver = _Resolver(doc, openapi30=str(doc.get("openapi", "")).startswith("3.0"))
    ops: list[Operation] = []
    used_names: set[str] = set()
    for path, item in (doc.get("paths") or {}).items():
        item = resolver.deref(item)
        if not isinstance(item, dict):
            continue
        for method in HTTP_METHODS:
            raw = item.get(method)
            if not isinstance(raw, dict):
                continue
            try:
                op = _operation(resolver, path, method.upper(), item, raw, tool_prefix, used_names)
            except OpenAPIError as e:
                raise OpenAPIError(f"{method.upper()} {path}: {e}") from None
            if op is not None:
                used_names.add(op.tool_name)
                ops.append(op)
    return ops


def _operation(resolver: _Resolver, path: str, method: str, item: dict[str, Any], raw: dict[str, Any],
               tool_prefix: str, used_names: set[str]) -> Operation | None:
    op_id = raw.get("operationId")
    if not isinstance(op_id, str) or not op_id:
        op_id = sanitize_tool_name(f"{method.lower()}_{path.strip('/').replace('{', '').replace('}', '')}")
    name = sanitize_tool_name(tool_prefix + op_id)
    base, n = name, 2
    while name in used_names:
        suffix = f"_{n}"
        name, n = base[:TOOL_NAME_MAX - len(suffix)] + suffix, n + 1

    # Operation-level parameters override path-level ones with the same (name, in).
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for p in [*(item.get("parameters") or []), *(raw.get("parameters") or [])]:
        p = resolver.deref(p)
        if isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("in"), str):
            merged[(p["name"], p["in"])] = p

    properties: dict[str, Any] = {}
    required: list[str] = []
    params: list[ParamSpec] = []
    for (pname, where), p in merged.items():
        if where == "cookie" or (where == "header" and pname.lower() in RESERVED_HEADERS):
            if p.get("required"):
                logger.warning("%s %s: required %s parameter %s cannot be set by tools; skipping operation",
                               method, path, where, pname)
                return None
            continue
        if where not in ("path", "query", "header"):
            continue
        json_encoded = False
        if "schema" in p:
            schema = resolver.schema(p["schema"], "input")
        else:
            found = _json_content(p.get("content"))
            schema = resolver.schema(found[1], "input") if found else {}
            json_encoded = found is not None
        if not isinstance(schema, dict):
            schema = {}
        if isinstance(p.get("description"), str) and "description" not in schema:
            schema = {**schema, "description": p["description"]}
        arg = pname if pname not in properties else f"{where}_{pname}"
        properties[arg] = schema
        is_required = where == "path" or bool(p.get("required"))
        if is_required:
            required.append(arg)
        params.append(ParamSpec(pname, arg, where, is_required, json_encoded))

    body_arg: str | None = None
    body_props: tuple[str, ...] = ()
    has_body = False
    body = resolver.deref(raw.get("requestBody"))
    if isinstance(body, dict):
        found = _json_content(body.get("content"))
        body_required = bool(body.get("required"))
        if found is None:
            if body_required:
                logger.warning("%s %s: request body is not JSON; skipping operation", method, path)
                return None
        else:
            has_body = True
            schema = resolver.schema(found[1], "input")
            props = schema.get("properties") if isinstance(schema, dict) else None
            flat = (_is_object_schema(schema) and isinstance(props, dict) and props
                    and not set(props) & set(properties)
                    and not any(k in schema for k in ("allOf", "anyOf", "oneOf", "not", "if")))
            if flat and isinstance(schema, dict) and isinstance(props, dict):
                properties.update(props)
                body_props = tuple(props)
                if body_required:
                    required.extend(r for r in schema.get("required", []) if r in props)
            else:
                body_arg = "body" if "body" not in properties else "request_body"
                if isinstance(body.get("description"), str) and isinstance(schema, dict):
                    schema.setdefault("description", body["description"])
                properties[body_arg] = schema
                if body_required:
                    required.append(body_arg)

    input_schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        input_schema["required"] = required

    summary = raw.get("summary") if isinstance(raw.get("summary"), str) else None
    text = raw.get("description") if isinstance(raw.get("description"), str) else None
    description = "\n\n".join(x for x in (summary, text) if x) or f"{method} {path}"
    annotations = {**_ANNOTATIONS[method], "openWorldHint": False}
    override = raw.get("x-mcp-annotations")
    if isinstance(override, dict):
        annotations.update({k: v for k, v in override.items()
                            if k in _ANNOTATION_KEYS and isinstance(v, bool)})
    return Operation(
        operation_id=op_id, tool_name=name, method=method, path=path, title=summary,
        description=description, params=tuple(params), input_schema=input_schema,
        output_schema=_output_schema(resolver, raw.get("responses")), annotations=annotations,
        body_arg=body_arg, body_props=body_props, has_body=has_body,
    )


def _output_schema(resolver: _Resolver, responses: Any) -> dict[str, Any] | None:
    """The 2xx JSON schema, only when every 2xx answer shares it and it is an object.

    A declared outputSchema obliges every successful result to carry matching structured content,
    so anything ambiguous (a 204 beside a 200, two different 2xx bodies) declares none.
    """
    if not isinstance(responses, dict):
        return None
    schemas: list[Any] = []
    for code, resp in responses.items():
        if not (str(code).startswith("2") and len(str(code)) == 3):
            continue
        resp = resolver.deref(resp)
        found = _json_content(resp.get("content")) if isinstance(resp, dict) else None
        if found is None:
            return None
        schemas.append(resolver.schema(found[1], "output"))
    if not schemas or any(s != schemas[0] for s in schemas[1:]) or not _is_object_schema(schemas[0]):
        return None
    out = schemas[0]
    if "type" not in out:
        out = {"type": "object", **out}
    return out if isinstance(out, dict) else None


def select_operations(ops: list[Operation], allow: list[str], allow_all: bool) -> list[Operation]:
    """Apply the allowlist (operationIds or tool names); unknown names are a start-up error."""
    if allow_all:
        return ops
    if not allow:
        raise OpenAPIError("no operation is allowed: pass --allow OPERATION_ID (repeatable) or --allow-all")
    known = {op.operation_id: op for op in ops} | {op.tool_name: op for op in ops}
    unknown = [a for a in allow if a not in known]
    if unknown:
        raise OpenAPIError(f"unknown operation(s) in the allowlist: {', '.join(unknown)}; "
                           f"the document has: {', '.join(sorted(op.operation_id for op in ops))}")
    chosen = {known[a].tool_name for a in allow}
    return [op for op in ops if op.tool_name in chosen]


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def build_request(op: Operation, args: dict[str, Any]) -> HttpRequest:
    """Turn validated tool arguments into the backend request of ``op``."""
    path = op.path
    query: list[tuple[str, str]] = []
    headers: dict[str, str] = {}
    for p in op.params:
        if p.arg not in args or args[p.arg] is None:
            if p.required:
                raise BadArguments(f"missing required argument {p.arg!r}")
            continue
        value = args[p.arg]
        if p.location == "path":
            text = json.dumps(value) if p.json_encoded else _scalar(value)
            if text in ("", ".", ".."):
                raise BadArguments(f"argument {p.arg!r} must not be empty, '.' or '..'")
            path = path.replace("{" + p.name + "}", urllib.parse.quote(text, safe=""))
        elif p.location == "query":
            if isinstance(value, list) and not p.json_encoded:
                query.extend((p.name, _scalar(v)) for v in value)
            else:
                query.append((p.name, json.dumps(value) if p.json_encoded else _scalar(value)))
        else:
            text = _scalar(value)
            if any(c in text for c in "\r\n\0"):
                raise BadArguments(f"argument {p.arg!r} must not contain line breaks")
            headers[p.name] = text
    body: Any = None
    if op.body_arg is not None:
        body = args.get(op.body_arg)
    elif op.body_props:
        body = {k: args[k] for k in op.body_props if k in args}
    return HttpRequest(op.method, path, tuple(query), headers, body,
                       op.has_body and (body is not None or op.body_props != ()))
