"""Tools, resources and prompts named by the conformance suite's server scenarios.

Each fixture answers exactly what its scenario checks (names, content types, MIME types); the
suite's own descriptions are the reference. Binary payloads are tiny valid files made here.
"""

from __future__ import annotations

import argparse
import base64
import struct
import zlib
from typing import Any

from mcp_servers.core import MCPServer, ToolContext, ToolError

EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


def _png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _wav_silence(samples: int = 8) -> bytes:
    data = b"\x00\x00" * samples
    fmt = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


PNG_B64 = base64.b64encode(_png_1x1()).decode()
WAV_B64 = base64.b64encode(_wav_silence()).decode()


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def build_server(_args: argparse.Namespace | None = None) -> MCPServer:
    server = MCPServer("mcp-conformance-server", version="1.0.0",
                       instructions="Fixtures for the MCP conformance suite.")
    _tools(server)
    _elicitation_tools(server)
    _resources(server)
    _prompts(server)
    return server


def _tools(server: MCPServer) -> None:
    @server.tool(name="test_simple_text", description="Returns a simple text content",
                 input_schema=EMPTY_OBJECT, annotations={"readOnlyHint": True})
    async def simple_text(_ctx: ToolContext, _args: dict[str, Any]) -> str:
        return "This is a simple text response for testing."

    @server.tool(name="test_image_content", description="Returns image content", input_schema=EMPTY_OBJECT)
    async def image(_ctx: ToolContext, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "image", "data": PNG_B64, "mimeType": "image/png"}]

    @server.tool(name="test_audio_content", description="Returns audio content", input_schema=EMPTY_OBJECT)
    async def audio(_ctx: ToolContext, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "audio", "data": WAV_B64, "mimeType": "audio/wav"}]

    @server.tool(name="test_embedded_resource", description="Returns an embedded resource",
                 input_schema=EMPTY_OBJECT)
    async def embedded(_ctx: ToolContext, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "resource", "resource": {"uri": "test://embedded-resource", "mimeType": "text/plain",
                                                  "text": "This is an embedded resource content."}}]

    @server.tool(name="test_multiple_content_types", description="Returns text, image and resource content",
                 input_schema=EMPTY_OBJECT)
    async def mixed(_ctx: ToolContext, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            _text("Multiple content types test:"),
            {"type": "image", "data": PNG_B64, "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "test://mixed-content-resource",
                                              "mimeType": "application/json",
                                              "text": '{"test": "data", "value": 123}'}},
        ]

    @server.tool(name="test_tool_with_logging", description="Sends log notifications while running",
                 input_schema=EMPTY_OBJECT)
    async def with_logging(ctx: ToolContext, _args: dict[str, Any]) -> str:
        await ctx.log("info", "Tool execution started", logger="conformance")
        await ctx.log("info", "Tool processing data", logger="conformance")
        await ctx.log("info", "Tool execution completed", logger="conformance")
        return "Tool with logging executed successfully"

    @server.tool(name="test_tool_with_progress", description="Reports progress while running",
                 input_schema=EMPTY_OBJECT)
    async def with_progress(ctx: ToolContext, _args: dict[str, Any]) -> str:
        for step in (0, 50, 100):
            await ctx.progress(step, 100, f"step {step}")
        return f"Progress tool completed (token {ctx.progress_token})"

    @server.tool(name="test_error_handling", description="Always fails with an error result",
                 input_schema=EMPTY_OBJECT)
    async def error_handling(_ctx: ToolContext, _args: dict[str, Any]) -> str:
        raise ToolError("This tool intentionally returns an error for testing")

    @server.tool(name="test_sampling", description="Asks the client's LLM via sampling/createMessage",
                 input_schema={"type": "object", "properties": {"prompt": {"type": "string"}},
                               "required": ["prompt"]})
    async def sampling(ctx: ToolContext, args: dict[str, Any]) -> str:
        result = await ctx.sample([{"role": "user", "content": _text(args["prompt"])}], max_tokens=100)
        content = result.get("content")
        text = content.get("text") if isinstance(content, dict) else None
        return f"LLM response: {text}"

    @server.tool(name="test_elicitation", description="Asks the user for information via elicitation",
                 input_schema={"type": "object", "properties": {"message": {"type": "string"}},
                               "required": ["message"]})
    async def elicitation(ctx: ToolContext, args: dict[str, Any]) -> str:
        result = await ctx.elicit(args["message"], {
            "type": "object",
            "properties": {"username": {"type": "string", "description": "User's response"},
                           "email": {"type": "string", "description": "User's email address"}},
            "required": ["username", "email"]})
        return f"User response: action={result.get('action')}, content={result.get('content')}"

    @server.tool(name="json_schema_2020_12_tool",
                 description="Tool whose inputSchema uses JSON Schema 2020-12",
                 input_schema={
                     "$schema": "https://json-schema.org/draft/2020-12/schema",
                     "type": "object",
                     "$defs": {"address": {"type": "object", "properties": {
                         "street": {"type": "string"}, "city": {"type": "string"}}}},
                     "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
                     "additionalProperties": False})
    async def schema_2020(_ctx: ToolContext, args: dict[str, Any]) -> str:
        return f"received {sorted(args)}"

    @server.tool(name="test_reconnection", description="Closes its SSE stream mid-call (SEP-1699 polling)",
                 input_schema=EMPTY_OBJECT)
    async def reconnection(ctx: ToolContext, _args: dict[str, Any]) -> str:
        # The answer is buffered and delivered when the client resumes with Last-Event-ID.
        await ctx.close_stream()
        return "Reconnection test completed"


def _elicitation_tools(server: MCPServer) -> None:
    @server.tool(name="test_elicitation_sep1034_defaults", description="Elicitation with default values",
                 input_schema=EMPTY_OBJECT)
    async def defaults(ctx: ToolContext, _args: dict[str, Any]) -> str:
        result = await ctx.elicit("Please review and update the form fields with defaults", {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "User name", "default": "John Doe"},
                "age": {"type": "integer", "description": "User age", "default": 30},
                "score": {"type": "number", "description": "User score", "default": 95.5},
                "status": {"type": "string", "description": "User status",
                           "enum": ["active", "inactive", "pending"], "default": "active"},
                "verified": {"type": "boolean", "description": "Verified", "default": True},
            }})
        return f"Elicitation completed: action={result.get('action')}, content={result.get('content')}"

    @server.tool(name="test_elicitation_sep1330_enums", description="Elicitation with every enum variant",
                 input_schema=EMPTY_OBJECT)
    async def enums(ctx: ToolContext, _args: dict[str, Any]) -> str:
        result = await ctx.elicit("Please select options from the enum fields", {
            "type": "object",
            "properties": {
                "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
                "titledSingle": {"type": "string", "oneOf": [
                    {"const": "value1", "title": "First Option"},
                    {"const": "value2", "title": "Second Option"},
                    {"const": "value3", "title": "Third Option"}]},
                "legacyEnum": {"type": "string", "enum": ["opt1", "opt2", "opt3"],
                               "enumNames": ["Option One", "Option Two", "Option Three"]},
                "untitledMulti": {"type": "array",
                                  "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
                "titledMulti": {"type": "array", "items": {"anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"}]}},
            }})
        return f"Elicitation completed: action={result.get('action')}, content={result.get('content')}"


def _resources(server: MCPServer) -> None:
    @server.resource(uri="test://static-text", name="static-text", description="A static text resource",
                     mime_type="text/plain")
    async def static_text(_ctx: ToolContext) -> str:
        return "This is the content of the static text resource."

    @server.resource(uri="test://static-binary", name="static-binary", description="A static binary resource",
                     mime_type="image/png")
    async def static_binary(_ctx: ToolContext) -> bytes:
        return _png_1x1()

    @server.resource(uri="test://watched-resource", name="watched-resource",
                     description="A resource clients can subscribe to", mime_type="text/plain")
    async def watched(_ctx: ToolContext) -> str:
        return "Watched resource content"

    @server.resource(uri="test://example-resource", name="example-resource",
                     description="A resource embedded by a prompt", mime_type="text/plain")
    async def example(_ctx: ToolContext) -> str:
        return "Example resource content"

    @server.resource_template(uri_template="test://template/{id}/data", name="template",
                              description="A resource template with one parameter",
                              mime_type="application/json")
    async def template(_ctx: ToolContext, uri: str, params: dict[str, str]) -> str:
        return f'{{"id": "{params["id"]}", "templateTest": true, "data": "Data for ID: {params["id"]}"}}'

    @server.completion
    async def complete(_ctx: ToolContext, ref: dict[str, Any], argument: dict[str, str]) -> list[str]:
        options = {"arg1": ["paris", "park", "party"], "arg2": ["test", "testing", "tested"]}
        return [v for v in options.get(argument["name"], []) if v.startswith(argument["value"])]


def _prompts(server: MCPServer) -> None:
    @server.prompt(name="test_simple_prompt", description="A simple prompt without arguments")
    async def simple(_ctx: ToolContext, _args: dict[str, str]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": _text("This is a simple prompt for testing.")}]

    @server.prompt(name="test_prompt_with_arguments", description="A prompt with required arguments",
                   arguments=[{"name": "arg1", "description": "First test argument", "required": True},
                              {"name": "arg2", "description": "Second test argument", "required": True}])
    async def with_args(_ctx: ToolContext, args: dict[str, str]) -> list[dict[str, Any]]:
        return [{"role": "user",
                 "content": _text(f"Prompt with arguments: arg1='{args['arg1']}', arg2='{args['arg2']}'")}]

    @server.prompt(name="test_prompt_with_embedded_resource", description="A prompt embedding a resource",
                   arguments=[{"name": "resourceUri", "description": "URI of the resource to embed",
                               "required": True}])
    async def with_resource(_ctx: ToolContext, args: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": {"type": "resource", "resource": {
                "uri": args["resourceUri"], "mimeType": "text/plain",
                "text": "Embedded resource content for testing."}}},
            {"role": "user", "content": _text("Please process the embedded resource above.")},
        ]

    @server.prompt(name="test_prompt_with_image", description="A prompt with image content")
    async def with_image(_ctx: ToolContext, _args: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": {"type": "image", "data": PNG_B64, "mimeType": "image/png"}},
            {"role": "user", "content": _text("Please analyze the image above.")},
        ]
