"""The files server over real HTTP with the official SDK client: tools, annotations, resources."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_servers.files.sandbox import DEMO_FILES, Sandbox
from mcp_servers.files.server import create_server
from tests.mcp_servers.files.conftest import serve


# The SDK client lives in anyio cancel scopes that must be left in the task that entered them,
# so fixtures yield the server URL and each test opens its own client.
@pytest.fixture
async def url(root: Path) -> AsyncIterator[str]:
    sandbox = Sandbox(root, max_read_bytes=4096)
    try:
        async with serve(create_server(sandbox)) as endpoint:
            yield endpoint
    finally:
        sandbox.close()


@pytest.fixture
async def writer_url(root: Path) -> AsyncIterator[str]:
    sandbox = Sandbox(root, allow_write=True, max_write_bytes=1024)
    try:
        async with serve(create_server(sandbox)) as endpoint:
            yield endpoint
    finally:
        sandbox.close()


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def test_tools_and_annotations(url: str) -> None:
    """Read tools are annotated read-only and idempotent; write_file is absent unless enabled."""
    async with Client(url, mode="legacy") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"list_directory", "stat", "read_file", "search"}
        for tool in tools.values():
            assert tool.annotations is not None
            assert tool.annotations.read_only_hint is True and tool.annotations.destructive_hint is False
        assert tools["stat"].output_schema is not None and tools["list_directory"].output_schema is not None


async def test_write_tool_annotations(writer_url: str) -> None:
    """With writing enabled, write_file is listed as destructive, idempotent and not read-only."""
    async with Client(writer_url, mode="legacy") as writer:
        tools = {t.name: t for t in (await writer.list_tools()).tools}
        ann = tools["write_file"].annotations
        assert ann is not None and ann.read_only_hint is False and ann.destructive_hint is True
        assert ann.idempotent_hint is True


async def test_structured_output_matches_schema(url: str) -> None:
    """stat and list_directory return structuredContent that validates against their outputSchema."""
    async with Client(url, mode="legacy") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for name, args in [("stat", {"path": "docs/guide.md"}), ("list_directory", {"path": "docs"})]:
            result = await client.call_tool(name, args)
            assert not result.is_error
            jsonschema.validate(result.structured_content, tools[name].output_schema or {})
        listing = await client.call_tool("list_directory", {})
        names = [e["name"] for e in (listing.structured_content or {})["entries"]]
        assert "escape_dir" in names and "docs" in names


async def test_read_file_text_image_and_blob(url: str) -> None:
    """Text comes back as text, PNG as image content, other binaries as an embedded blob."""
    async with Client(url, mode="legacy") as client:
        text = await client.call_tool("read_file", {"path": "docs/guide.md"})
        assert text_of(text) == DEMO_FILES["docs/guide.md"].decode()
        image = await client.call_tool("read_file", {"path": "images/pixel.png"})
        assert image.content[0].type == "image"
        assert base64.b64decode(image.content[0].data) == DEMO_FILES["images/pixel.png"]
        blob = await client.call_tool("read_file", {"path": "blob.bin", "offset": 250})
        assert blob.content[0].type == "resource"
        assert base64.b64decode(blob.content[0].resource.blob) == bytes(range(250, 256))  # type: ignore[union-attr]


@pytest.mark.parametrize(("path", "fragment"), [
    ("../outside/secret.txt", "'..' is not allowed"),
    ("/etc/passwd", "absolute paths are not allowed"),
    ("escape_file", "symbolic link"),
    ("escape_dir/secret.txt", "symbolic link"),
    ("docs/\x00", "NUL"),
    ("nope.txt", "does not exist"),
])
async def test_read_file_refusals_are_tool_errors(url: str, path: str, fragment: str) -> None:
    """Traversal, symlink escapes and missing files give isError results that say why."""
    async with Client(url, mode="legacy") as client:
        result = await client.call_tool("read_file", {"path": path})
        assert result.is_error is True
        assert fragment in text_of(result)
        assert "TOP SECRET" not in text_of(result)


async def test_invalid_arguments_are_tool_errors(url: str) -> None:
    """Arguments that break the input schema give an isError result, not a crash."""
    async with Client(url, mode="legacy") as client:
        result = await client.call_tool("read_file", {"path": 7})
        assert result.is_error is True
        result = await client.call_tool("read_file", {"path": "x", "length": 10**9})
        assert result.is_error is True


async def test_read_limit_hint(url: str, root: Path) -> None:
    """A file over --max-read-bytes is refused with a hint to read it in parts."""
    async with Client(url, mode="legacy") as client:
        (root / "big.txt").write_bytes(b"y" * 5000)
        result = await client.call_tool("read_file", {"path": "big.txt"})
        assert result.is_error is True and "offset and length" in text_of(result)
        part = await client.call_tool("read_file", {"path": "big.txt", "offset": 4990, "length": 100})
        assert text_of(part) == "y" * 10


async def test_search_tool(url: str) -> None:
    """search finds by glob and content and never looks through symlinked directories."""
    async with Client(url, mode="legacy") as client:
        res = await client.call_tool("search", {"pattern": "*.md"})
        paths = [m["path"] for m in (res.structured_content or {})["matches"]]
        assert paths == ["README.md", "docs/guide.md"]
        res = await client.call_tool("search", {"text": "needle"})
        assert (res.structured_content or {})["matches"] == []
        res = await client.call_tool("search", {})
        assert res.is_error is True


async def test_write_file_disabled_by_default(url: str, root: Path) -> None:
    """Without --allow-write the tool does not exist and nothing is written."""
    async with Client(url, mode="legacy") as client:
        try:
            result = await client.call_tool("write_file", {"path": "x.txt", "content": "x"})
        except MCPError:
            pass
        else:
            assert result.is_error is True
        assert not (root / "x.txt").exists()


async def test_write_file_enabled(writer_url: str, root: Path, outside: Path) -> None:
    """Writes land inside the root (text and base64); escapes and oversize content are refused."""
    async with Client(writer_url, mode="legacy") as writer:
        args = {"path": "out/a.txt", "content": "hello", "create_parents": True}
        ok = await writer.call_tool("write_file", args)
        assert not ok.is_error and (root / "out/a.txt").read_text() == "hello"
        raw = base64.b64encode(b"\x00\x01").decode()
        ok = await writer.call_tool("write_file", {"path": "b.bin", "content": raw, "encoding": "base64"})
        assert not ok.is_error and (root / "b.bin").read_bytes() == b"\x00\x01"
        for path in ["escape_file", "escape_dir/new.txt", "../outside/new.txt"]:
            bad = await writer.call_tool("write_file",
                                         {"path": path, "content": "pwned", "create_parents": True})
            assert bad.is_error is True, path
        big = await writer.call_tool("write_file", {"path": "big.txt", "content": "x" * 2000})
        assert big.is_error is True and "limit" in text_of(big)
        assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
        assert (outside / "secret.txt").read_text() == "TOP SECRET needle\n"


async def test_files_as_resources(url: str) -> None:
    """Files are listed and readable as file:/// resources; links and traversal are not."""
    async with Client(url, mode="legacy") as client:
        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        assert "file:///README.md" in listed and "file:///with%20space.txt" in listed
        assert not any("escape" in uri for uri in listed)
        readme = await client.read_resource("file:///README.md")
        assert readme.contents[0].text == DEMO_FILES["README.md"].decode()  # type: ignore[union-attr]
        png = await client.read_resource("file:///images/pixel.png")
        assert png.contents[0].mime_type == "image/png"
        assert base64.b64decode(png.contents[0].blob) == DEMO_FILES["images/pixel.png"]  # type: ignore[union-attr]
        spaced = await client.read_resource("file:///with%20space.txt")
        assert spaced.contents[0].text == "spaced\n"  # type: ignore[union-attr]
        for uri in ["file:///escape_file", "file:///escape_dir/secret.txt", "file:///..%2Foutside%2Fsecret.txt",
                    "file:///docs/%2E%2E/%2E%2E/outside/secret.txt", "file:///nope"]:
            with pytest.raises(MCPError):
                await client.read_resource(uri)


def parse(argv: list[str]) -> Any:
    import argparse

    from mcp_servers.files.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_build_server_flags(tmp_path: Path) -> None:
    """A missing root is refused unless --seed-demo creates it; bad limits are refused at start-up."""
    from mcp_servers.files.server import build_server

    with pytest.raises(SystemExit):
        build_server(parse(["--root", str(tmp_path / "missing")]))
    server = build_server(parse(["--root", str(tmp_path / "new"), "--seed-demo", "--allow-write"]))
    assert server.name == "files" and (tmp_path / "new" / "README.md").is_file()
    with pytest.raises(SystemExit):
        build_server(parse(["--root", str(tmp_path / "new"), "--max-read-bytes", "0"]))
