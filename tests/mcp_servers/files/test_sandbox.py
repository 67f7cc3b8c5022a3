"""The sandbox confines every operation to its root, with real files and real symlinks."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_servers.files.sandbox import DEMO_FILES, Sandbox, SandboxError, seed_demo, split_path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("TOP SECRET needle\n")
    return d


@pytest.fixture
def root(tmp_path: Path, outside: Path) -> Path:
    r = tmp_path / "root"
    seed_demo(r)
    (r / "escape_file").symlink_to(outside / "secret.txt")
    (r / "escape_dir").symlink_to(outside)
    (r / "inner_link").symlink_to(r / "README.md")
    (r / "rel_escape").symlink_to("../outside/secret.txt")
    return r


@pytest.fixture
def box(root: Path) -> Iterator[Sandbox]:
    with Sandbox(root, max_read_bytes=1024, max_write_bytes=64, allow_write=True) as sb:
        yield sb


def code_of(excinfo: pytest.ExceptionInfo[SandboxError]) -> str:
    return excinfo.value.code


@pytest.mark.parametrize("path", ["..", "../outside/secret.txt", "docs/../../outside", "a/./../b",
                                  "/etc/passwd", "/", "docs/\x00x", "x" * 5000, "a/" + "b" * 300])
def test_split_path_rejects_escapes(path: str) -> None:
    """Dot-dot, absolute, NUL-bearing and oversized paths are refused before any system call."""
    with pytest.raises(SandboxError) as ei:
        split_path(path)
    assert code_of(ei) == "invalid_path"


def test_split_path_normalises_harmless_forms() -> None:
    """Empty components and '.' collapse; the root is the empty tuple."""
    assert split_path("") == ()
    assert split_path("./") == ()
    assert split_path("docs//./guide.md") == ("docs", "guide.md")


@given(st.lists(st.sampled_from(["a", ".", "/", "..", "\x00", "b/", "\\"]), max_size=30).map("".join))
def test_split_path_never_yields_traversal(path: str) -> None:
    """Whatever the input, accepted components are plain names (no '..', '/', '.', '' or NUL)."""
    try:
        parts = split_path(path)
    except SandboxError:
        return
    for part in parts:
        assert part not in ("", ".", "..") and "/" not in part and "\x00" not in part


@pytest.mark.parametrize("path", ["escape_file", "escape_dir/secret.txt", "rel_escape", "inner_link"])
def test_read_refuses_symlinks(box: Sandbox, path: str) -> None:
    """Symlinks (to outside files, through outside directories, even to inside files) are not followed."""
    with pytest.raises(SandboxError) as ei:
        box.read_file(path)
    assert code_of(ei) == "symlink_refused"


def test_symlinked_parent_refused_for_list_and_search(box: Sandbox) -> None:
    """A symlinked directory cannot be listed, and search never descends into it."""
    with pytest.raises(SandboxError) as ei:
        box.list_directory("escape_dir")
    assert code_of(ei) == "symlink_refused"
    found = box.search(text="needle")
    assert found["matches"] == []
    found = box.search(name_glob="secret*")
    assert found["matches"] == []


def test_directory_swapped_for_symlink_is_refused(box: Sandbox, root: Path, outside: Path) -> None:
    """Replacing a directory with a link to outside between calls gives no access to outside."""
    assert box.read_file("docs/guide.md").is_text
    os.rename(root / "docs", root / "docs.old")
    (root / "docs").symlink_to(outside)
    with pytest.raises(SandboxError) as ei:
        box.read_file("docs/secret.txt")
    assert code_of(ei) == "symlink_refused"


def test_stat_describes_symlink_without_following(box: Sandbox) -> None:
    """stat of a link reports a symlink, never the size or type of its target."""
    info = box.stat("escape_file")
    assert info["type"] == "symlink"
    assert box.stat("docs")["type"] == "directory"
    assert box.stat("README.md")["mimeType"] == "text/markdown"


def test_list_directory_sorted_with_types(box: Sandbox) -> None:
    """Entries come back sorted by name with their own (unfollowed) type."""
    listing = box.list_directory(".")
    names = [e["name"] for e in listing["entries"]]
    assert names == sorted(names)
    kinds = {e["name"]: e["type"] for e in listing["entries"]}
    assert kinds["docs"] == "directory" and kinds["escape_dir"] == "symlink" and kinds["README.md"] == "file"
    assert listing["truncated"] is False


def test_list_directory_is_bounded(root: Path) -> None:
    """More entries than the limit are cut off and flagged as truncated."""
    with Sandbox(root, max_list_entries=2) as sb:
        listing = sb.list_directory(".")
    assert len(listing["entries"]) == 2 and listing["truncated"] is True


def test_read_text_and_binary(box: Sandbox) -> None:
    """UTF-8 files read as text, others as bytes that base64-encode losslessly."""
    text = box.read_file("docs/guide.md")
    assert text.is_text and text.data == DEMO_FILES["docs/guide.md"]
    png = box.read_file("images/pixel.png")
    assert not png.is_text and png.mime_type == "image/png"
    assert base64.b64decode(png.text_or_base64()) == DEMO_FILES["images/pixel.png"]


def test_read_size_limit_and_ranges(box: Sandbox, root: Path) -> None:
    """Files above the limit are refused with a hint, and can be read in slices."""
    (root / "big.txt").write_bytes(b"x" * 2000 + b"END")
    with pytest.raises(SandboxError) as ei:
        box.read_file("big.txt")
    assert code_of(ei) == "too_large" and "offset and length" in ei.value.message
    tail = box.read_file("big.txt", offset=2000, length=100)
    assert tail.data == b"END" and tail.size == 2003


def test_read_refuses_directories_fifos_and_missing(box: Sandbox, root: Path) -> None:
    """Directories, FIFOs (without blocking) and missing files give distinct errors."""
    os.mkfifo(root / "pipe")
    cases = {"docs": "is_a_directory", "pipe": "not_a_file", "nope.txt": "not_found",
             "README.md/x": "not_a_directory"}
    for path, code in cases.items():
        with pytest.raises(SandboxError) as ei:
            box.read_file(path)
        assert code_of(ei) == code, path


def test_write_disabled_by_default(root: Path) -> None:
    """Without allow_write nothing is written."""
    with Sandbox(root) as sb, pytest.raises(SandboxError) as ei:
        sb.write_file("new.txt", b"hi")
    assert code_of(ei) == "write_disabled"
    assert not (root / "new.txt").exists()


def test_write_creates_and_replaces(box: Sandbox, root: Path) -> None:
    """Writes create files (and parents on request) and replace existing ones atomically."""
    assert box.write_file("new.txt", b"one")["created"] is True
    assert box.write_file("new.txt", b"two")["created"] is False
    assert (root / "new.txt").read_bytes() == b"two"
    with pytest.raises(SandboxError) as ei:
        box.write_file("a/b/c.txt", b"x")
    assert code_of(ei) == "not_found"
    box.write_file("a/b/c.txt", b"x", create_parents=True)
    assert (root / "a/b/c.txt").read_bytes() == b"x"
    assert not [p for p in root.rglob("*.tmp")]


def test_write_cannot_escape(box: Sandbox, outside: Path) -> None:
    """Writing through a symlinked file or parent, or to '..', changes nothing outside."""
    for path in ["escape_file", "escape_dir/secret.txt", "escape_dir/new.txt", "../outside/x.txt",
                 "escape_dir/sub/new.txt"]:
        with pytest.raises(SandboxError):
            box.write_file(path, b"pwned", create_parents=True)
    assert (outside / "secret.txt").read_text() == "TOP SECRET needle\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_write_size_limit(box: Sandbox) -> None:
    """Content above the write limit is refused."""
    with pytest.raises(SandboxError) as ei:
        box.write_file("big.txt", b"x" * 65)
    assert code_of(ei) == "too_large"


def test_search_by_name_and_text(box: Sandbox) -> None:
    """Search finds files by glob, by content (case-insensitive by default) and by both."""
    by_name = box.search(name_glob="*.md")
    assert [m["path"] for m in by_name["matches"]] == ["README.md", "docs/guide.md"]
    by_text = box.search(text="SEARCH FINDS")
    assert by_text["matches"] == [{"path": "docs/guide.md", "line": 4, "snippet": "Search finds this line."}]
    assert box.search(text="SEARCH FINDS", case_sensitive=True)["matches"] == []
    both = box.search(name_glob="*.txt", text="example.com")
    assert [m["path"] for m in both["matches"]] == ["docs/notes.txt"]
    with pytest.raises(SandboxError):
        box.search()


def test_search_is_bounded(root: Path) -> None:
    """Results beyond max_results are cut off and flagged; a stop callback ends the scan."""
    with Sandbox(root, max_search_results=1) as sb:
        res = sb.search(name_glob="*", max_results=50)
        assert len(res["matches"]) == 1 and res["truncated"] is True
        stopped = sb.search(name_glob="*", should_stop=lambda: True)
        assert stopped["matches"] == [] and stopped["truncated"] is True


def test_list_files_skips_links(box: Sandbox) -> None:
    """The resource listing holds only regular files, never symlinks."""
    files, truncated = box.list_files(100)
    paths = {f["path"] for f in files}
    assert paths == set(DEMO_FILES) and truncated is False
    assert box.list_files(1) == ([files[0]], True)


def test_root_may_be_a_symlink(tmp_path: Path, root: Path) -> None:
    """An operator-chosen root reached through a symlink is resolved once and works."""
    link = tmp_path / "rootlink"
    link.symlink_to(root)
    with Sandbox(link) as sb:
        assert sb.root == str(root)
        assert sb.read_file("README.md").is_text
