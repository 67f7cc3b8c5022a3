"""MCPServer: the registry a server author fills with decorators, and method dispatch.

The transport (``transport.py``) owns the lifecycle (initialize, sessions, cancellation, client
responses); this module answers the feature methods for a prepared :class:`ToolContext`.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson

from gateway.mcp import PROTOCOL_VERSIONS
from mcp_servers.core.context import ToolContext
from mcp_servers.core.errors import InvalidParams, McpError, MethodNotFound, ResourceNotFound, ToolError
from mcp_servers.core.registry import (
    Prompt,
    Resource,
    ResourceTemplate,
    Tool,
    ToolResult,
    compile_uri_template,
)
from mcp_servers.core.schema import SchemaValidator
from mcp_servers.core.settings import LOG_LEVELS

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
MAX_COMPLETIONS = 100

Hook = Callable[[], Awaitable[None]]
# An async generator function: code before ``yield`` runs at start-up, code after it at clean-up.
Lifespan = Callable[[], AsyncIterator[None]]
H = TypeVar("H", bound=Hook)
L = TypeVar("L", bound=Lifespan)


def encode_cursor(kind: str, offset: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([kind, offset])).decode().rstrip("=")


def decode_cursor(cursor: Any, kind: str, total: int) -> int:
    """The offset inside an opaque cursor this server issued; anything else is -32602."""
    if cursor is None:
        return 0
    if not isinstance(cursor, str) or len(cursor) > 200:
        raise InvalidParams("invalid cursor")
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise InvalidParams("invalid cursor") from None
    if (not isinstance(value, list) or len(value) != 2 or value[0] != kind
            or not isinstance(value[1], int) or isinstance(value[1], bool)
            or not 0 <= value[1] <= total):
        raise InvalidParams("invalid cursor")
    return int(value[1])


def paginate(items: list[dict[str, Any]], key: str, params: dict[str, Any],
             page_size: int) -> dict[str, Any]:
    start = decode_cursor(params.get("cursor"), key, len(items))
    end = start + page_size
    result: dict[str, Any] = {key: items[start:end]}
    if end < len(items):
        result["nextCursor"] = encode_cursor(key, end)
    return result


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


class MCPServer:
    """An MCP server definition: name, version and the handlers registered on it."""

    def __init__(self, name: str, version: str = "0.1.0", instructions: str | None = None,
                 title: str | None = None) -> None:
        self.name = name
        self.version = version
        self.instructions = instructions
        self.title = title
        self.tools: dict[str, Tool] = {}
        self.resources: dict[str, Resource] = {}
        self.templates: list[ResourceTemplate] = []
        self.prompts: dict[str, Prompt] = {}
        self.resource_listers: list[Callable[[ToolContext], Awaitable[list[dict[str, Any]]]]] = []
        self.completion_handler: Callable[..., Awaitable[list[str]]] | None = None
        # Start-up / clean-up of resources that need the event loop (pools, client sessions), in
        # registration order; clean-up runs in reverse order, after in-flight requests finished.
        self.lifespans: list[Lifespan] = []

    # ---- registration -------------------------------------------------------------------------

    def tool(self, *, name: str, description: str, input_schema: dict[str, Any] | None = None,
             output_schema: dict[str, Any] | None = None, annotations: dict[str, Any] | None = None,
             title: str | None = None) -> Callable[[F], F]:
        if name in self.tools:
            raise ValueError(f"tool {name!r} is registered twice")
        schema = input_schema if input_schema is not None else {"type": "object", "properties": {}}
        if schema.get("type") != "object":
            raise ValueError(f"tool {name!r}: inputSchema must have type 'object'")
        validator = SchemaValidator(schema, what=f"tool {name!r} inputSchema")
        out_validator = None
        if output_schema is not None:
            if output_schema.get("type") != "object":
                raise ValueError(f"tool {name!r}: outputSchema must have type 'object'")
            out_validator = SchemaValidator(output_schema, what=f"tool {name!r} outputSchema")

        def register(fn: F) -> F:
            self.tools[name] = Tool(name=name, description=description, input_schema=schema,
                                    handler=fn, validator=validator, output_schema=output_schema,
                                    output_validator=out_validator, annotations=annotations, title=title)
            return fn
        return register

    def resource(self, *, uri: str, name: str, description: str | None = None,
                 mime_type: str | None = None, title: str | None = None) -> Callable[[F], F]:
        if uri in self.resources:
            raise ValueError(f"resource {uri!r} is registered twice")

        def register(fn: F) -> F:
            self.resources[uri] = Resource(uri=uri, name=name, handler=fn, description=description,
                                           mime_type=mime_type, title=title)
            return fn
        return register

    def resource_template(self, *, uri_template: str, name: str, description: str | None = None,
                          mime_type: str | None = None, title: str | None = None) -> Callable[[F], F]:
        pattern, _ = compile_uri_template(uri_template)

        def register(fn: F) -> F:
            self.templates.append(ResourceTemplate(uri_template=uri_template, name=name, handler=fn,
                                                   pattern=pattern, description=description,
                                                   mime_type=mime_type, title=title))
            return fn
        return register

    def resource_lister(self, fn: F) -> F:
        self.resource_listers.append(fn)
        return fn

    def prompt(self, *, name: str, description: str | None = None,
               arguments: list[dict[str, Any]] | None = None, title: str | None = None) -> Callable[[F], F]:
        if name in self.prompts:
            raise ValueError(f"prompt {name!r} is registered twice")

        def register(fn: F) -> F:
            self.prompts[name] = Prompt(name=name, handler=fn, description=description,
                                        arguments=list(arguments or []), title=title)
            return fn
        return register

    def completion(self, fn: F) -> F:
        self.completion_handler = fn
        return fn

    # ---- lifecycle ----------------------------------------------------------------------------

    def lifespan(self, fn: L) -> L:
        """Register an async generator function: set-up before ``yield``, tear-down after it.

        Runs when the app starts (before the first request is accepted) and, after the drain, when
        it stops. A failing set-up stops the start-up; tear-downs of earlier lifespans still run.
        """
        self.lifespans.append(fn)
        return fn

    def on_startup(self, fn: H) -> H:
        """Register ``async def fn() -> None`` to run when the app starts."""
        async def startup() -> AsyncIterator[None]:
            await fn()
            yield
        self.lifespans.append(startup)
        return fn

    def on_cleanup(self, fn: H) -> H:
        """Register ``async def fn() -> None`` to run when the app stops (after in-flight calls)."""
        async def cleanup() -> AsyncIterator[None]:
            yield
            await fn()
        self.lifespans.append(cleanup)
        return fn

    # ---- protocol facts ---------------------------------------------------------------------

    @property
    def has_resources(self) -> bool:
        return bool(self.resources or self.templates or self.resource_listers)

    def capabilities(self) -> dict[str, Any]:
        caps: dict[str, Any] = {"logging": {}}
        if self.tools:
            caps["tools"] = {"listChanged": True}
        if self.has_resources:
            caps["resources"] = {"subscribe": True, "listChanged": True}
        if self.prompts:
            caps["prompts"] = {"listChanged": True}
        if self.completion_handler is not None:
            caps["completions"] = {}
        return caps

    def server_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.title is not None:
            info["title"] = self.title
        return info

    def initialize_result(self, version: str) -> dict[str, Any]:
        result: dict[str, Any] = {"protocolVersion": version, "capabilities": self.capabilities(),
                                  "serverInfo": self.server_info()}
        if self.instructions is not None:
            result["instructions"] = self.instructions
        return result

    def discover_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {"supportedVersions": list(PROTOCOL_VERSIONS),
                                  "capabilities": self.capabilities(), "serverInfo": self.server_info()}
        if self.instructions is not None:
            result["instructions"] = self.instructions
        return result

    # ---- dispatch ---------------------------------------------------------------------------

    async def dispatch(self, method: str, params: dict[str, Any], ctx: ToolContext,
                       page_size: int) -> dict[str, Any]:
        """Answer one feature method or raise :class:`McpError`."""
        if method == "ping":
            return {}
        if method == "server/discover":
            return self.discover_result()
        if method == "logging/setLevel":
            return self._set_level(params, ctx)
        if method.startswith("tools/") and self.tools:
            if method == "tools/list":
                return paginate([t.describe() for t in self.tools.values()], "tools", params, page_size)
            if method == "tools/call":
                return await self.call_tool(params, ctx)
        if method.startswith("resources/") and self.has_resources:
            if method == "resources/list":
                return paginate(await self._list_resources(ctx), "resources", params, page_size)
            if method == "resources/templates/list":
                return paginate([t.describe() for t in self.templates], "resourceTemplates", params,
                                page_size)
            if method == "resources/read":
                return await self.read_resource(_str_param(params, "uri"), ctx)
            if method in ("resources/subscribe", "resources/unsubscribe"):
                return self._subscribe(method, _str_param(params, "uri"), ctx)
        if method.startswith("prompts/") and self.prompts:
            if method == "prompts/list":
                return paginate([p.describe() for p in self.prompts.values()], "prompts", params, page_size)
            if method == "prompts/get":
                return await self.get_prompt(params, ctx)
        if method == "completion/complete" and self.completion_handler is not None:
            return await self.complete(params, ctx)
        raise MethodNotFound(f"method not found: {method}", data={"method": method})

    def _set_level(self, params: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        level = params.get("level")
        if level not in LOG_LEVELS:
            raise InvalidParams(f"params.level must be one of {', '.join(LOG_LEVELS)}")
        if ctx.session is not None:
            ctx.session.log_level = level
        return {}

    def _subscribe(self, method: str, uri: str, ctx: ToolContext) -> dict[str, Any]:
        if ctx.session is None:
            raise MethodNotFound(f"{method} needs a session (protocol 2025-06-18 or 2025-11-25)")
        if method == "resources/subscribe":
            ctx.session.subscriptions.add(uri)
        else:
            ctx.session.subscriptions.discard(uri)
        return {}

    async def call_tool(self, params: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        name = _str_param(params, "name")
        tool = self.tools.get(name)
        if tool is None:
            raise InvalidParams(f"unknown tool: {name}", data={"tool": name})
        args = params.get("arguments")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise InvalidParams("params.arguments must be an object")
        problem = tool.validator.problem(args)
        if problem is not None:
            return {"content": [_text(f"invalid arguments for {name}: {problem}")], "isError": True}
        try:
            value = await tool.handler(ctx, args)
        except ToolError as exc:
            return {"content": [_text(exc.message)], "isError": True}
        except McpError:
            raise
        except Exception:  # noqa: BLE001 - the top-level handler of author code: a bug there
            # must not take the request (or the process) down; the model gets a generic error.
            logger.exception("tool %s failed", name)
            return {"content": [_text(f"internal error in tool {name}")], "isError": True}
        return self._tool_result(tool, value)

    def _tool_result(self, tool: Tool, value: Any) -> dict[str, Any]:
        if isinstance(value, ToolResult):
            result: dict[str, Any] = {"content": value.content}
            if value.structured is not None:
                result["structuredContent"] = value.structured
            if value.is_error:
                result["isError"] = True
        elif isinstance(value, str):
            result = {"content": [_text(value)]}
        elif isinstance(value, dict):
            result = {"content": [_text(orjson.dumps(value).decode())], "structuredContent": value}
        elif isinstance(value, list):
            result = {"content": value}
        else:
            raise TypeError(f"tool {tool.name} returned {type(value).__name__}; "
                            "return str, dict, list of content blocks or ToolResult")
        if tool.output_validator is not None and not result.get("isError"):
            structured = result.get("structuredContent")
            problem = ("missing structuredContent" if structured is None
                       else tool.output_validator.problem(structured, root="structuredContent"))
            if problem is not None:
                logger.error("tool %s broke its outputSchema: %s", tool.name, problem)
                return {"content": [_text(f"tool {tool.name} produced output that does not match its "
                                          f"outputSchema: {problem}")], "isError": True}
        return result

    async def _list_resources(self, ctx: ToolContext) -> list[dict[str, Any]]:
        items = [r.describe() for r in self.resources.values()]
        for lister in self.resource_listers:
            items.extend(await lister(ctx))
        return items

    async def read_resource(self, uri: str, ctx: ToolContext) -> dict[str, Any]:
        resource = self.resources.get(uri)
        mime: str | None
        if resource is not None:
            value = await resource.handler(ctx)
            mime = resource.mime_type
        else:
            for template in self.templates:
                params = template.match(uri)
                if params is not None:
                    value = await template.handler(ctx, uri, params)
                    mime = template.mime_type
                    break
            else:
                raise ResourceNotFound(uri)
        if isinstance(value, tuple):
            value, mime = value
        content: dict[str, Any] = {"uri": uri}
        if mime is not None:
            content["mimeType"] = mime
        if isinstance(value, bytes):
            content["blob"] = base64.b64encode(value).decode("ascii")
        elif isinstance(value, str):
            content["text"] = value
        else:
            raise TypeError(f"resource {uri} handler returned {type(value).__name__}; return str or bytes")
        return {"contents": [content]}

    async def get_prompt(self, params: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        name = _str_param(params, "name")
        prompt = self.prompts.get(name)
        if prompt is None:
            raise InvalidParams(f"unknown prompt: {name}", data={"prompt": name})
        args = params.get("arguments") or {}
        if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
            raise InvalidParams("params.arguments must be an object of strings")
        missing = [a["name"] for a in prompt.arguments if a.get("required") and a["name"] not in args]
        if missing:
            raise InvalidParams(f"prompt {name}: missing required argument {missing[0]!r}")
        messages = await prompt.handler(ctx, args)
        result: dict[str, Any] = {"messages": messages}
        if prompt.description is not None:
            result["description"] = prompt.description
        return result

    async def complete(self, params: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        assert self.completion_handler is not None
        ref = params.get("ref")
        argument = params.get("argument")
        if not isinstance(ref, dict) or ref.get("type") not in ("ref/prompt", "ref/resource"):
            raise InvalidParams('params.ref must be {"type": "ref/prompt"|"ref/resource", ...}')
        if not (isinstance(argument, dict) and isinstance(argument.get("name"), str)
                and isinstance(argument.get("value"), str)):
            raise InvalidParams("params.argument must be {name: string, value: string}")
        values = await self.completion_handler(ctx, ref, argument)
        return {"completion": {"values": values[:MAX_COMPLETIONS], "total": len(values),
                               "hasMore": len(values) > MAX_COMPLETIONS}}


def _str_param(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str):
        raise InvalidParams(f"params.{key} must be a string")
    return value
