"""A directory sandbox that no path can escape.

Every operation walks the path one component at a time with ``os.open(..., dir_fd=parent)`` and
``O_NOFOLLOW``, starting from a descriptor of the root opened once at start-up. The kernel, not a
string check, therefore decides what each component is at the moment it is opened: a symbolic
link anywhere in the path (to a file or a directory, inside or outside the root) is refused, and
swapping a directory for a symlink between two calls changes nothing, because no call ever
re-resolves a path from the root by name. ``..`` and absolute paths are rejected before any
system call so the error message can say why.
"""

from __future__ import annotations

import base64
import errno
import fnmatch
import mimetypes
import os
import secrets
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.paths import MAX_PATH_CHARS, MAX_PATH_SEGMENTS

MAX_NAME_BYTES = 255
_TEXT_SNIFF_BYTES = 8192
_SNIPPET_CHARS = 200

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted in the root must not hang the worker thread.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SandboxError(Exception):
    """A refused or failed sandbox operation; ``code`` is stable, the message is for the caller."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def split_path(path: str) -> tuple[str, ...]:
    """Validate a client path and split it into components relative to the root.

    ``""``, ``"."`` and ``"./"`` name the root. Only forward slashes separate components.
    """
    if not isinstance(path, str):
        raise SandboxError("invalid_path", "path must be a string")
    if "\x00" in path:
        raise SandboxError("invalid_path", "path contains a NUL byte")
    if not path.isascii():
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate: os.fsencode would raise, or (surrogateescape) open a name the
            # policy's facts never judged.
            raise SandboxError("invalid_path", "path is not valid Unicode (lone surrogate)") from None
    if len(path) > MAX_PATH_CHARS:
        raise SandboxError("invalid_path", f"path is longer than {MAX_PATH_CHARS} characters")
    if path.count("/") >= MAX_PATH_SEGMENTS:
        raise SandboxError("invalid_path", f"path has more than {MAX_PATH_SEGMENTS} segments")
    if path.startswith("/"):
        raise SandboxError(
            "invalid_path",
            f"absolute paths are not allowed: {path!r}; give a path relative to the sandbox root",
        )
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise SandboxError("invalid_path", f"'..' is not allowed in paths: {path!r}")
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise SandboxError("invalid_path", f"path component longer than {MAX_NAME_BYTES} bytes")
        parts.append(part)
    return tuple(parts)


def display_path(parts: tuple[str, ...]) -> str:
    return "/".join(parts) if parts else "."


def guess_mime_type(name: str) -> str | None:
    return mimetypes.guess_type(name, strict=False)[0]


def looks_like_text(data: bytes) -> bool:
    """UTF-8 without NUL bytes counts as text; everything else is returned as binary."""
    if b"\x00" in data[:_TEXT_SNIFF_BYTES]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _kind(mode: int) -> str:
    if stat_mod.S_ISREG(mode):
        return "file"
    if stat_mod.S_ISDIR(mode):
        return "directory"
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    return "other"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class FileData:
    path: str
    data: bytes
    size: int
    offset: int
    mime_type: str | None
    is_text: bool

    def text_or_base64(self) -> str:
        return self.data.decode("utf-8") if self.is_text else base64.b64encode(self.data).decode("ascii")


class Sandbox:
    """Blocking filesystem operations confined to ``root``; call them from a worker thread."""

    def __init__(self, root: str | Path, *, max_read_bytes: int = 1 << 20, max_write_bytes: int = 1 << 20,
                 allow_write: bool = False, max_list_entries: int = 1000, max_search_results: int = 100,
                 max_search_files: int = 5000, max_search_bytes: int = 64 << 20) -> None:
        if max_read_bytes <= 0 or max_write_bytes <= 0:
            raise ValueError("size limits must be positive")
        # The root itself may be reached through a symlink the operator chose; resolve it once.
        self.root = os.path.realpath(root)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.max_read_bytes = max_read_bytes
        self.max_write_bytes = max_write_bytes
        self.allow_write = allow_write
        self.max_list_entries = max_list_entries
        self.max_search_results = max_search_results
        self.max_search_files = max_search_files
        self.max_search_bytes = max_search_bytes

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- walking ---------------------------------------------------------------------------------

    def _refusal(self, err: OSError, parent_fd: int, name: str, shown: str) -> SandboxError:
        """Turn an ``os.open`` failure into a message that says what was wrong with the path."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat_mod.S_ISLNK(st.st_mode):
            return SandboxError("symlink_refused", f"{shown!r} is a symbolic link; links are not followed")
        if err.errno == errno.ENOENT:
            return SandboxError("not_found", f"{shown!r} does not exist")
        if err.errno == errno.ENOTDIR:
            return SandboxError("not_a_directory", f"{shown!r} is not a directory")
        if err.errno in (errno.EACCES, errno.EPERM):
            return SandboxError("permission_denied", f"permission denied for {shown!r}")
        return SandboxError("io_error", f"cannot open {shown!r}: {err.strerror}")

    def _open_dir(self, parts: tuple[str, ...], *, create: bool = False) -> int:
        """Open the directory named by ``parts`` without following any link; caller closes it."""
        fd = os.open(".", _DIR_FLAGS, dir_fd=self._root_fd)
        for i, name in enumerate(parts):
            try:
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass  # created concurrently: the O_NOFOLLOW open below still checks it
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                refusal = self._refusal(err, fd, name, display_path(parts[: i + 1]))
                os.close(fd)
                raise refusal from None
            os.close(fd)
            fd = nfd
        return fd

    def _open_leaf(self, parts: tuple[str, ...], flags: int) -> int:
        """Open the last component with ``flags`` (which must include O_NOFOLLOW or O_PATH)."""
        if not parts:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root_fd)
        pfd = self._open_dir(parts[:-1])
        try:
            try:
                return os.open(parts[-1], flags, dir_fd=pfd)
            except OSError as err:
                raise self._refusal(err, pfd, parts[-1], display_path(parts)) from None
        finally:
            os.close(pfd)

    # -- operations --------------------------------------------------------------------------------

    def stat(self, path: str) -> dict[str, Any]:
        """Metadata of one entry; a symlink is described, never followed."""
        parts = split_path(path)
        fd = self._open_leaf(parts, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        kind = _kind(st.st_mode)
        return {
            "path": display_path(parts),
            "type": kind,
            "size": st.st_size,
            "modified": _iso(st.st_mtime),
            "mode": oct(stat_mod.S_IMODE(st.st_mode)),
            "mimeType": guess_mime_type(parts[-1]) if parts and kind == "file" else None,
        }

    def list_directory(self, path: str) -> dict[str, Any]:
        """Entries of a directory sorted by name, at most ``max_list_entries`` of them."""
        parts = split_path(path)
        fd = self._open_dir(parts)
        entries: list[dict[str, Any]] = []
        truncated = False
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if len(entries) >= self.max_list_entries:
                        truncated = True
                        break
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while listing
                    entries.append({
                        "name": entry.name,
                        "path": display_path((*parts, entry.name)),
                        "type": _kind(st.st_mode),
                        "size": st.st_size,
                        "modified": _iso(st.st_mtime),
                    })
        finally:
            os.close(fd)
        entries.sort(key=lambda e: str(e["name"]))
        return {"path": display_path(parts), "entries": entries, "truncated": truncated}

    def read_file(self, path: str, offset: int = 0, length: int | None = None) -> FileData:
        """Read a regular file (or a slice of it) within ``max_read_bytes``."""
        parts = split_path(path)
        if not parts:
            raise SandboxError("is_a_directory", "'.' is a directory; use list_directory")
        if offset < 0 or (length is not None and length < 0):
            raise SandboxError("invalid_argument", "offset and length must not be negative")
        fd = self._open_leaf(parts, _READ_FLAGS)
        try:
            st = os.fstat(fd)
            shown = display_path(parts)
            if stat_mod.S_ISDIR(st.st_mode):
                raise SandboxError("is_a_directory", f"{shown!r} is a directory; use list_directory")
            if not stat_mod.S_ISREG(st.st_mode):
                raise SandboxError("not_a_file", f"{shown!r} is not a regular file")
            wanted = max(st.st_size - offset, 0) if length is None else length
            if wanted > self.max_read_bytes:
                raise SandboxError(
                    "too_large",
                    f"{shown!r} has {st.st_size} bytes; reading {wanted} exceeds the limit of "
                    f"{self.max_read_bytes} bytes: pass offset and length to read it in parts",
                )
            chunks: list[bytes] = []
            got = 0
            while got < wanted:
                chunk = os.pread(fd, wanted - got, offset + got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        return FileData(path=shown, data=data, size=st.st_size, offset=offset,
                        mime_type=guess_mime_type(parts[-1]), is_text=looks_like_text(data))

    def write_file(self, path: str, data: bytes, *, create_parents: bool = False) -> dict[str, Any]:
        """Atomically replace (or create) a regular file; only when writing is enabled."""
        if not self.allow_write:
            raise SandboxError("write_disabled",
                               "writing is disabled on this server (start it with --allow-write)")
        parts = split_path(path)
        if not parts:
            raise SandboxError("is_a_directory", "cannot write to the sandbox root")
        if len(data) > self.max_write_bytes:
            raise SandboxError(
                "too_large",
                f"content has {len(data)} bytes; the write limit is {self.max_write_bytes} bytes")
        shown = display_path(parts)
        name = parts[-1]
        pfd = self._open_dir(parts[:-1], create=create_parents)
        try:
            try:
                existing: os.stat_result | None = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and not stat_mod.S_ISREG(existing.st_mode):
                kind = _kind(existing.st_mode)
                raise SandboxError(
                    "symlink_refused" if kind == "symlink" else "not_a_file",
                    f"{shown!r} is a {kind}; only regular files can be written")
            # Write a sibling temp file and rename it over the target: readers never see half a
            # file, and rename() replaces the directory entry itself rather than following it.
            tmp = f".{name[:200]}.{secrets.token_hex(6)}.tmp"
            tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                          dir_fd=pfd)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(tfd, view):]
                    os.fsync(tfd)
                finally:
                    os.close(tfd)
                os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except OSError as err:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except FileNotFoundError:
                    pass
                raise SandboxError("io_error", f"cannot write {shown!r}: {err.strerror}") from None
        finally:
            os.close(pfd)
        return {"path": shown, "size": len(data), "created": existing is None}

    def delete_file(self, path: str) -> dict[str, Any]:
        """Remove one regular file; only when writing is enabled. A path that does not exist
        answers ``deleted: false`` (a repeated delete is harmless); a directory, a symlink or
        anything else that is not a regular file is refused, and so is every path outside."""
        if not self.allow_write:
            raise SandboxError("write_disabled",
                               "writing is disabled on this server (start it with --allow-write)")
        parts = split_path(path)
        if not parts:
            raise SandboxError("is_a_directory", "cannot delete the sandbox root")
        shown = display_path(parts)
        name = parts[-1]
        try:
            pfd = self._open_dir(parts[:-1])
        except SandboxError as err:
            if err.code == "not_found":
                return {"path": shown, "deleted": False}
            raise
        try:
            try:
                existing = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                return {"path": shown, "deleted": False}
            if not stat_mod.S_ISREG(existing.st_mode):
                kind = _kind(existing.st_mode)
                raise SandboxError(
                    {"symlink": "symlink_refused", "directory": "is_a_directory"}.get(kind, "not_a_file"),
                    f"{shown!r} is a {kind}; only regular files can be deleted")
            # unlink() removes the directory entry itself: were it swapped for a link or a
            # directory since the check, the link (never its target) goes, or the call fails.
            try:
                os.unlink(name, dir_fd=pfd)
            except FileNotFoundError:
                return {"path": shown, "deleted": False}
            except OSError as err:
                raise SandboxError("io_error", f"cannot delete {shown!r}: {err.strerror}") from None
        finally:
            os.close(pfd)
        return {"path": shown, "deleted": True}

    def _walk_files(self, parts: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str, int]]:
        """Yield (directory parts, file name, directory fd) for regular files under ``parts``."""
        top = self._open_dir(parts)
        try:
            # fwalk never descends into a symlinked directory (it compares lstat and fstat).
            for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                dirnames.sort()
                rel = tuple(p for p in dirpath.split("/") if p not in ("", "."))
                for name in sorted(filenames):
                    yield (*parts, *rel), name, dirfd
        finally:
            os.close(top)

    def list_files(self, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` regular files of the whole tree, for the resource listing."""
        files: list[dict[str, Any]] = []
        for dparts, name, dirfd in self._walk_files(()):
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat_mod.S_ISREG(st.st_mode):
                continue
            if len(files) >= limit:
                return files, True
            files.append({"path": display_path((*dparts, name)), "size": st.st_size,
                          "mimeType": guess_mime_type(name)})
        return files, False

    def search(self, path: str = ".", name_glob: str | None = None, text: str | None = None,
               max_results: int | None = None, case_sensitive: bool = False,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Find regular files by name glob and/or text content, within fixed work bounds."""
        if not name_glob and not text:
            raise SandboxError("invalid_argument", "give a name glob, a text to search for, or both")
        limit = min(max_results or self.max_search_results, self.max_search_results)
        needle = text if (text is None or case_sensitive) else text.casefold()
        parts = split_path(path)
        matches: list[dict[str, Any]] = []
        scanned = 0
        scanned_bytes = 0
        truncated = False
        for dparts, name, dirfd in self._walk_files(parts):
            if should_stop is not None and should_stop():
                truncated = True
                break
            rel = display_path((*dparts, name))
            glob_hit = name_glob and (fnmatch.fnmatchcase(name, name_glob)
                                      or fnmatch.fnmatchcase(rel, name_glob))
            if name_glob and not glob_hit:
                continue
            if scanned >= self.max_search_files or scanned_bytes >= self.max_search_bytes:
                truncated = True
                break
            scanned += 1
            match: dict[str, Any] = {"path": rel}
            if needle is not None:
                found = self._grep(dirfd, name, needle, case_sensitive)
                if found is None:
                    continue
                scanned_bytes += found[2]
                if found[0] == 0:
                    continue
                match["line"], match["snippet"] = found[0], found[1]
            if len(matches) >= limit:
                truncated = True
                break
            matches.append(match)
        return {"matches": matches, "truncated": truncated, "scannedFiles": scanned}

    def _grep(self, dirfd: int, name: str, needle: str, case_sensitive: bool) -> tuple[int, str, int] | None:
        """(first matching line number or 0, snippet, bytes read); None if not a readable text file."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dirfd)
        except OSError:
            return None  # symlinks, vanished or unreadable files are skipped, not errors
        try:
            if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.pread(fd, self.max_read_bytes, 0)
        finally:
            os.close(fd)
        if b"\x00" in data[:_TEXT_SNIFF_BYTES]:
            return None
        content = data.decode("utf-8", errors="replace")
        for lineno, line in enumerate(content.splitlines(), start=1):
            hay = line if case_sensitive else line.casefold()
            if needle in hay:
                return lineno, line.strip()[:_SNIPPET_CHARS], len(data)
        return 0, "", len(data)


DEMO_FILES: dict[str, bytes] = {
    "README.md": b"# Demo sandbox\n\nFiles served by the `files` MCP server.\n",
    "docs/guide.md": b"# Guide\n\nThe gateway checks every tool call against policy.\n"
                     b"Search finds this line.\n",
    "docs/notes.txt": b"Quarterly review: revenue up, costs flat.\nContact: ops@example.com\n",
    "data/customers.csv": b"id,name,email\n1,Ada Lovelace,ada@example.com\n2,Alan Turing,alan@example.com\n",
    # A 1x1 transparent PNG: the binary sample for blob reads.
    "images/pixel.png": base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="),
}


def seed_demo(root: str | Path) -> None:
    """Create ``root`` with a few demo files; existing files are left alone."""
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    for rel, content in DEMO_FILES.items():
        target = base / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_bytes(content)
