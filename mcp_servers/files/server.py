"""The ``files`` MCP server: a sandboxed directory as tools and ``file:///`` resources."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
from pathlib import Path
from typing import Any

from gateway.paths import file_uri, file_uri_path
from mcp_servers.core import MCPServer, ResourceNotFound, ToolContext, ToolError, ToolResult
from mcp_servers.files.sandbox import Sandbox, SandboxError, seed_demo

logger = logging.getLogger(__name__)

DEFAULT_MAX_READ_BYTES = 1 << 20
DEFAULT_MAX_WRITE_BYTES = 1 << 20
MAX_LISTED_RESOURCES = 1000

READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True, "openWorldHint": False}
# Overwrites existing files (destructive); writing the same content twice leaves the same state.
WRITE = {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True, "openWorldHint": False}
# Deleting a file that is already gone answers deleted: false.
DELETE = WRITE

_PATH = {"type": "string", "maxLength": 4096,
         "description": "Path relative to the sandbox root ('.' is the root); '/'-separated."}
_TIME = {"type": "string", "description": "Last modification, ISO 8601 UTC"}
_KIND = {"type": "string", "enum": ["file", "directory", "symlink", "other"]}

STAT_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string"}, "type": _KIND, "size": {"type": "integer"}, "modified": _TIME,
        "mode": {"type": "string"}, "mimeType": {"type": ["string", "null"]},
    },
    "required": ["path", "type", "size", "modified", "mode", "mimeType"],
}
LIST_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "entries": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "path": {"type": "string"}, "type": _KIND,
                           "size": {"type": "integer"}, "modified": _TIME},
            "required": ["name", "path", "type", "size", "modified"],
        }},
        "truncated": {"type": "boolean", "description": "More entries exist than were returned"},
    },
    "required": ["path", "entries", "truncated"],
}
SEARCH_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "matches": {"type": "array", "items": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "line": {"type": "integer"},
                           "snippet": {"type": "string"}},
            "required": ["path"],
        }},
        "truncated": {"type": "boolean"},
        "scannedFiles": {"type": "integer"},
    },
    "required": ["matches", "truncated", "scannedFiles"],
}
DELETE_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {"path": {"type": "string"},
                   "deleted": {"type": "boolean", "description": "False when no such file existed"}},
    "required": ["path", "deleted"],
}


def _readable_uri(path: str) -> str | None:
    """The URI of ``path`` if resources/read can name it: names that are not UTF-8, or hold '%' or
    a backslash, have none (the tools still reach them), so the listing leaves them out."""
    try:
        uri = file_uri(path)
    except UnicodeEncodeError:
        return None
    return uri if file_uri_path(uri) == path else None


def _tool_error(err: SandboxError) -> ToolError:
    return ToolError(f"{err.message} [{err.code}]")


def create_server(sandbox: Sandbox) -> MCPServer:
    """Register the tools and resources of one sandbox on a new :class:`MCPServer`."""
    writable = sandbox.allow_write
    server = MCPServer(
        "files", version="0.1.0",
        instructions=(
            "A sandboxed directory. Paths are relative to its root and '/'-separated; '..', absolute "
            "paths and symbolic links are refused. Files are also resources at file:///<path>."
            + ("" if writable else " This instance is read-only.")),
    )

    async def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except SandboxError as err:
            raise _tool_error(err) from None

    @server.tool(name="list_directory", title="List directory",
                 description="List the entries of a directory in the sandbox (not recursive; symlinks are "
                             "shown, never followed).",
                 input_schema={"type": "object", "properties": {"path": {**_PATH, "default": "."}},
                               "additionalProperties": False},
                 output_schema=LIST_OUTPUT, annotations=READ_ONLY)
    async def list_directory(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await run(sandbox.list_directory, args.get("path", "."))
        return result

    @server.tool(name="stat", title="File metadata",
                 description="Type, size, modification time, permissions and MIME type of one path.",
                 input_schema={"type": "object", "properties": {"path": _PATH}, "required": ["path"],
                               "additionalProperties": False},
                 output_schema=STAT_OUTPUT, annotations=READ_ONLY)
    async def stat(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await run(sandbox.stat, args["path"])
        return result

    @server.tool(name="read_file", title="Read file",
                 description=f"Read a file. UTF-8 text comes back as text, anything else as a base64 blob. "
                             f"At most {sandbox.max_read_bytes} bytes per call: use offset and length "
                             f"to read larger files in parts.",
                 input_schema={"type": "object", "properties": {
                     "path": _PATH,
                     "offset": {"type": "integer", "minimum": 0, "default": 0},
                     "length": {"type": "integer", "minimum": 0, "maximum": sandbox.max_read_bytes},
                 }, "required": ["path"], "additionalProperties": False},
                 annotations=READ_ONLY)
    async def read_file(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        got = await run(sandbox.read_file, args["path"], args.get("offset", 0), args.get("length"))
        if got.is_text:
            return ToolResult(content=[{"type": "text", "text": got.data.decode("utf-8")}])
        blob = base64.b64encode(got.data).decode("ascii")
        mime = got.mime_type or "application/octet-stream"
        if mime.startswith("image/"):
            item: dict[str, Any] = {"type": "image", "data": blob, "mimeType": mime}
        else:
            item = {"type": "resource",
                    "resource": {"uri": file_uri(got.path), "mimeType": mime, "blob": blob}}
        return ToolResult(content=[item])

    @server.tool(name="search", title="Search files",
                 description="Find files under a directory by name glob (e.g. '*.md', matched against the "
                             "name and the relative path) and/or by text they contain. Results are bounded; "
                             "'truncated' says when there were more.",
                 input_schema={"type": "object", "properties": {
                     "path": {**_PATH, "default": "."},
                     "pattern": {"type": "string", "minLength": 1, "maxLength": 512},
                     "text": {"type": "string", "minLength": 1, "maxLength": 1024},
                     "case_sensitive": {"type": "boolean", "default": False},
                     "max_results": {"type": "integer", "minimum": 1, "maximum": sandbox.max_search_results},
                 }, "additionalProperties": False},
                 output_schema=SEARCH_OUTPUT, annotations=READ_ONLY)
    async def search(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await run(
            sandbox.search, args.get("path", "."), args.get("pattern"), args.get("text"),
            args.get("max_results"), bool(args.get("case_sensitive", False)), ctx.cancelled.is_set)
        return result

    if writable:
        @server.tool(name="write_file", title="Write file",
                     description=f"Create or replace a file atomically (at most {sandbox.max_write_bytes} "
                                 f"bytes). Use encoding 'base64' for binary content.",
                     input_schema={"type": "object", "properties": {
                         "path": _PATH,
                         "content": {"type": "string"},
                         "encoding": {"type": "string", "enum": ["utf-8", "base64"], "default": "utf-8"},
                         "create_parents": {"type": "boolean", "default": False},
                     }, "required": ["path", "content"], "additionalProperties": False},
                     annotations=WRITE)
        async def write_file(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
            content: str = args["content"]
            if args.get("encoding", "utf-8") == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except ValueError:
                    raise ToolError("content is not valid base64 [invalid_argument]") from None
            else:
                data = content.encode("utf-8")
            result: dict[str, Any] = await run(sandbox.write_file, args["path"], data,
                                               create_parents=bool(args.get("create_parents", False)))
            await ctx.notify_resource_updated(file_uri(result["path"]))
            return result

        @server.tool(name="delete_file", title="Delete file",
                     description="Delete one regular file (never a directory or a symbolic link). "
                                 "deleted is false when the file does not exist, so a repeated call is "
                                 "harmless.",
                     input_schema={"type": "object", "properties": {"path": _PATH}, "required": ["path"],
                                   "additionalProperties": False},
                     output_schema=DELETE_OUTPUT, annotations=DELETE)
        async def delete_file(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
            result: dict[str, Any] = await run(sandbox.delete_file, args["path"])
            if result["deleted"]:
                await ctx.notify_resource_updated(file_uri(result["path"]))
            return result

    @server.resource_template(uri_template="file:///{+path}", name="file",
                              description="A file in the sandbox, by its relative path.")
    async def read_resource(ctx: ToolContext, uri: str, params: dict[str, str]) -> tuple[str | bytes, str]:
        # The gateway's policy judged the path gateway.paths.file_uri_path reads from this URI;
        # reading it with the same function (not the template's raw match) opens that same path,
        # and any other spelling of it names no file here either.
        path = file_uri_path(uri)
        if path is None:
            logger.info("resource %r refused: not a canonical file URI", uri[:200])
            raise ResourceNotFound(uri, "not a canonical file URI: use the URI resources/list gives "
                                        "(file:/// + the percent-encoded path) [invalid_uri]")
        try:
            got = await asyncio.to_thread(sandbox.read_file, path)
        except SandboxError as err:
            logger.info("resource %s refused: %s", uri, err.code)
            raise ResourceNotFound(uri, f"{err.message} [{err.code}]") from None
        mime = got.mime_type or ("text/plain" if got.is_text else "application/octet-stream")
        return (got.data.decode("utf-8") if got.is_text else got.data), mime

    @server.resource_lister
    async def list_resources(ctx: ToolContext) -> list[dict[str, Any]]:
        files, truncated = await asyncio.to_thread(sandbox.list_files, MAX_LISTED_RESOURCES)
        if truncated:
            logger.info("resource listing cut at %d files", MAX_LISTED_RESOURCES)
        return [{"uri": uri, "name": f["path"], "mimeType": f["mimeType"] or "application/octet-stream",
                 "size": f["size"]} for f in files if (uri := _readable_uri(f["path"])) is not None]

    return server


def default_root() -> Path:
    state = os.environ.get("MCP_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "mcp-gateway")
    return Path(state) / "files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=None,
                        help="sandbox root directory (default: $MCP_STATE_DIR/files)")
    parser.add_argument("--seed-demo", action="store_true",
                        help="create the root if missing and add demo files (existing files are kept)")
    parser.add_argument("--allow-write", action="store_true",
                        help="expose the write_file and delete_file tools (off by default)")
    parser.add_argument("--max-read-bytes", type=int, default=DEFAULT_MAX_READ_BYTES)
    parser.add_argument("--max-write-bytes", type=int, default=DEFAULT_MAX_WRITE_BYTES)
    parser.add_argument("--max-search-results", type=int, default=100)
    parser.add_argument("--max-list-entries", type=int, default=1000)


def build_server(ns: argparse.Namespace) -> MCPServer:
    root: Path = ns.root or default_root()
    if ns.seed_demo:
        seed_demo(root)
    if not root.is_dir():
        raise SystemExit(f"files: root {root} is not a directory (pass --seed-demo to create it)")
    for flag in ("max_read_bytes", "max_write_bytes", "max_search_results", "max_list_entries"):
        if getattr(ns, flag) <= 0:
            raise SystemExit(f"files: --{flag.replace('_', '-')} must be positive")
    sandbox = Sandbox(root, max_read_bytes=ns.max_read_bytes, max_write_bytes=ns.max_write_bytes,
                      allow_write=ns.allow_write, max_list_entries=ns.max_list_entries,
                      max_search_results=ns.max_search_results)
    logger.info("files: serving %s (write %s)", sandbox.root, "enabled" if ns.allow_write else "disabled")
    return create_server(sandbox)
