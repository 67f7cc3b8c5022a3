"""delete_file: one regular file inside the sandbox, only when writing is enabled; directories,
symbolic links and every path outside the root are refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client

from mcp_servers.files.sandbox import Sandbox, SandboxError
from mcp_servers.files.server import create_server
from tests.mcp_servers.files.conftest import serve


@pytest.fixture
def box(root: Path) -> Iterator[Sandbox]:
    with Sandbox(root, allow_write=True) as sb:
        yield sb


def snapshot(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def test_delete_removes_a_file_once(box: Sandbox, root: Path) -> None:
    """A regular file is removed; deleting it again (or a file that never existed) says deleted false."""
    assert box.delete_file("docs/notes.txt") == {"path": "docs/notes.txt", "deleted": True}
    assert not (root / "docs/notes.txt").exists() and (root / "docs/guide.md").exists()
    assert box.delete_file("docs/notes.txt")["deleted"] is False
    assert box.delete_file("no/such/dir/file.txt")["deleted"] is False


def test_delete_disabled_without_write(root: Path) -> None:
    """Without allow_write nothing is deleted."""
    with Sandbox(root) as sb, pytest.raises(SandboxError) as ei:
        sb.delete_file("README.md")
    assert ei.value.code == "write_disabled"
    assert (root / "README.md").exists()


@pytest.mark.parametrize("path", ["..", "../outside/secret.txt", "docs/../../outside/secret.txt",
                                  "/etc/passwd", "/", "docs/\x00x", "x" * 5000])
def test_delete_traversal_is_refused(box: Sandbox, root: Path, outside: Path, path: str) -> None:
    """'..', absolute and malformed paths are refused before any system call; nothing changes."""
    before, outside_before = snapshot(root), snapshot(outside)
    with pytest.raises(SandboxError) as ei:
        box.delete_file(path)
    assert ei.value.code == "invalid_path"
    assert snapshot(root) == before and snapshot(outside) == outside_before


@pytest.mark.parametrize(("path", "code"), [
    ("escape_file", "symlink_refused"),           # a link to a file outside
    ("escape_dir/secret.txt", "symlink_refused"),  # a file through a link to a directory outside
    ("docs", "is_a_directory"),
    (".", "is_a_directory"),
    ("", "is_a_directory"),
])
def test_delete_refuses_links_and_directories(box: Sandbox, root: Path, outside: Path, path: str,
                                              code: str) -> None:
    """A symbolic link (itself or in the path) and a directory are refused; the link, its target
    and the directory all stay."""
    with pytest.raises(SandboxError) as ei:
        box.delete_file(path)
    assert ei.value.code == code
    assert (outside / "secret.txt").read_text() == "TOP SECRET needle\n"
    assert (root / "escape_file").is_symlink() and (root / "docs").is_dir()


def test_delete_refuses_fifos(box: Sandbox, root: Path) -> None:
    """Anything that is not a regular file (a FIFO here) is refused."""
    os.mkfifo(root / "pipe")
    with pytest.raises(SandboxError) as ei:
        box.delete_file("pipe")
    assert ei.value.code == "not_a_file" and (root / "pipe").exists()


async def test_delete_file_tool(root: Path) -> None:
    """delete_file is listed only with writing enabled (destructive, idempotent) and deletes
    through the server; a refusal is an isError result naming the code."""
    with Sandbox(root) as reader, Sandbox(root, allow_write=True) as writer:
        async with serve(create_server(reader)) as url, Client(url, mode="legacy") as client:
            assert "delete_file" not in {t.name for t in (await client.list_tools()).tools}
        async with serve(create_server(writer)) as url, Client(url, mode="legacy") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            ann = tools["delete_file"].annotations
            assert ann is not None and ann.destructive_hint is True and ann.idempotent_hint is True
            done = await client.call_tool("delete_file", {"path": "README.md"})
            assert done.structured_content == {"path": "README.md", "deleted": True}
            refused = await client.call_tool("delete_file", {"path": "escape_file"})
            assert refused.is_error and "[symlink_refused]" in "".join(
                getattr(c, "text", "") for c in refused.content)
    assert not (root / "README.md").exists() and (root / "escape_file").is_symlink()
