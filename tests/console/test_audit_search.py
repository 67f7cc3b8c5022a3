"""Reading the audit trail backwards in blocks: every complete line once, newest first."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.console.audit_search import reverse_lines


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_reverse_lines_yields_every_complete_line_newest_first(tmp_path: Path, block: int) -> None:
    """Lines of any length across block boundaries come back in reverse; a torn last line
    (no newline: a crash mid-write) is skipped."""
    lines = [b"x" * n for n in (1, 50, 3, 200, 9)]
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n" + b'{"torn')
    assert list(reverse_lines(path, block)) == lines[::-1]
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert list(reverse_lines(path, block)) == lines[::-1]


def test_reverse_lines_of_a_file_with_only_a_torn_line(tmp_path: Path) -> None:
    """A file holding only an unterminated line has no complete line."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"torn')
    assert list(reverse_lines(path, 4)) == []
