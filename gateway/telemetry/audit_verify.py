"""Verify audit chains: every entry linked to the one before it, every checkpoint present.

Streaming: one line of each file and one checkpoint at a time are in memory, so a trail of any
size verifies in constant memory. The first problem of a chain stops that chain's check and is
reported with the file and line where the chain breaks:

- an altered entry: the next entry's ``prev`` (or a checkpoint's ``hash``) no longer matches it;
- a removed entry or file: ``seq`` jumps forward, or the oldest entry does not follow the chain's
  anchor (seq 0, or the last entry retention or rotation removed, see audit_retention.py);
- an inserted, duplicated or reordered entry: ``seq`` is not the one due;
- a truncated file: a rotated file whose last line has no newline, or checkpoints covering
  entries past the end of the trail.

An unterminated or unparseable last line of the current file is what SIGKILL during an append
leaves (the writer drops it on restart), so it is tolerated and reported as a torn tail.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.telemetry.audit import GENESIS, audit_files, line_hash
from gateway.telemetry.audit_chain import CHECKPOINT_SUFFIX, checkpoint_signature_ok
from gateway.telemetry.audit_retention import anchor_path, read_anchor

_CHAIN_FILE = re.compile(r"^(?P<base>.+\.jsonl)(?:\.\d+)?$")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


@dataclass
class ChainReport:
    base: Path
    files: int = 0
    entries: int = 0
    legacy: int = 0  # entries written before the chain existed (schema 1)
    checkpoints: int = 0
    signed_checkpoints: int = 0
    unsigned_checkpoints: int = 0  # a writer without a signing key (e.g. an MCP server's)
    torn_tail: bool = False
    first_seq: int | None = None
    last_seq: int | None = None
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def chain_bases(directory: str | Path) -> list[Path]:
    """The audit chains in ``directory``: each ``*.jsonl`` with or without rotated files."""
    bases = {m.group("base") for p in Path(directory).iterdir()
             if p.is_file() and (m := _CHAIN_FILE.match(p.name))}
    return [Path(directory) / b for b in sorted(bases)]


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line with its newline if any, whether it is the file's last line)."""
    with path.open("rb") as f:
        held: bytes | None = None
        n = 0
        for raw in f:
            if held is not None:
                yield n, held, False
            n += 1
            held = raw
        if held is not None:
            yield n, held, True


class _Checkpoints:
    """The chain's checkpoint file, read one record at a time in seq order."""

    def __init__(self, path: Path, base: str, public: Ed25519PublicKey | None,
                 report: ChainReport) -> None:
        self.path, self.base, self.public, self.report = path, base, public, report
        self._it = _lines(path) if path.exists() else iter(())
        self.current: tuple[int, dict[str, Any]] | None = None
        self._last_seq = -1
        # The seq of the first signed checkpoint: a writer that gained a signing key (an
        # upgrade, or signing turned on) signs from there on; an unsigned one after it means a
        # signature was stripped.
        self.first_signed_seq: int | None = None

    def advance(self) -> Problem | None:
        """Move to the next checkpoint (``current`` None at the end); a bad one is a problem."""
        self.current = None
        for n, raw, is_last in self._it:
            if not raw.endswith(b"\n"):
                if is_last:
                    return None  # torn by a crash while it was appended
                return Problem(self.path.name, n, "checkpoint line truncated")
            try:
                record = orjson.loads(raw)
                seq = int(record["seq"])
                str(record["hash"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                if is_last:
                    return None
                return Problem(self.path.name, n, "checkpoint is not valid (altered)")
            if record.get("file") != self.base:
                return Problem(self.path.name, n, f"checkpoint names {record.get('file')!r}, not {self.base}")
            if seq <= self._last_seq:
                return Problem(self.path.name, n, "checkpoints out of order (altered)")
            if record.get("sig") is None:
                if self.first_signed_seq is not None and self.public is not None:
                    return Problem(self.path.name, n, "unsigned checkpoint after a signed one "
                                                      "(signature stripped: altered)")
                self.report.unsigned_checkpoints += 1
            else:
                if self.first_signed_seq is None:
                    self.first_signed_seq = seq
                if self.public is not None:
                    if not checkpoint_signature_ok(record, self.public):
                        return Problem(self.path.name, n, "checkpoint signature is not valid")
                    self.report.signed_checkpoints += 1
            self.report.checkpoints += 1
            self._last_seq = seq
            self.current = (n, record)
            return None
        return None


def verify_chain(base: str | Path, public: Ed25519PublicKey | None = None, *,
                 require_signed: bool = False) -> ChainReport:
    """Check the chain of audit file ``base`` (with its rotated files); see the module docstring.

    With ``public`` every signed checkpoint (and the anchor) must carry a valid signature, and
    once a writer signs it signs every later checkpoint and anchor (unsigned ones are accepted
    only before the first signed one: a trail that gained a signing key, whose earlier entries
    the first signed checkpoint's hash covers); with ``require_signed`` too, a chain with
    entries must have a signed checkpoint (a writer without the key fails).
    """
    base = Path(base)
    report = ChainReport(base)
    files = audit_files(base)
    report.files = len(files)
    cps = _Checkpoints(base.with_name(base.name + CHECKPOINT_SUFFIX), base.name, public, report)
    report.problem = cps.advance()
    if report.problem:
        return report
    # Where the chain legitimately starts: after the last entry retention or rotation removed.
    anchor = read_anchor(base)
    anchor_seq, anchor_hash = -1, GENESIS
    unsigned_anchor = False
    if anchor is not None:
        name = anchor_path(base).name
        if anchor.get("file") != f"{base.name}:anchor" or not isinstance(anchor.get("seq"), int):
            report.problem = Problem(name, None, "anchor is not valid (altered)")
            return report
        if anchor.get("sig") is None:
            report.unsigned_checkpoints += 1  # written before its writer had a key (checked below)
            unsigned_anchor = True
        elif public is not None and not checkpoint_signature_ok(anchor, public):
            report.problem = Problem(name, None, "anchor signature is not valid")
            return report
        anchor_seq, anchor_hash = int(anchor["seq"]), str(anchor["hash"])
    expected: int | None = None
    prev_hash: bytes | None = None
    prev_place: tuple[str, int] | None = None
    for fi, file in enumerate(files):
        last_file = fi == len(files) - 1
        for n, raw, is_last in _lines(file):
            terminated = raw.endswith(b"\n")
            line = raw[:-1] if terminated else raw
            try:
                entry = orjson.loads(line) if terminated else None
            except orjson.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict):
                if is_last and last_file:
                    report.torn_tail = True
                    break
                what = "truncated (no newline)" if not terminated else "not a valid entry (altered)"
                report.problem = Problem(file.name, n, f"line {what}")
                return report
            digest = line_hash(line)
            if entry.get("v") == 1 or "seq" not in entry:
                report.legacy += 1
                expected, prev_hash, prev_place = None, digest, (file.name, n)
                continue
            seq, prev = entry.get("seq"), entry.get("prev")
            if not isinstance(seq, int) or not isinstance(prev, str):
                report.problem = Problem(file.name, n, "entry has no valid seq/prev (altered)")
                return report
            if expected is None and prev_hash is None:
                if seq <= anchor_seq:
                    continue  # removed by retention: a crash came between the anchor and the unlink
                if seq != anchor_seq + 1 or prev != anchor_hash:
                    what = (f"seq {anchor_seq} (the anchor)" if anchor is not None
                            else "the chain's start (seq 0)")
                    report.problem = Problem(file.name, n, f"oldest entry does not follow {what}: entries "
                                             "before it were removed without being recorded")
                    return report
            if expected is not None and prev_hash is not None and prev_place is not None:
                if seq > expected:
                    where = (f"; the end of {prev_place[0]} or a whole file before this one is missing"
                             if n == 1 else "")
                    report.problem = Problem(file.name, n, f"entry out of place: seq {seq} where {expected}"
                                             f" was due (entries removed or reordered before it){where}")
                    return report
                if seq < expected:
                    report.problem = Problem(file.name, n, f"entry out of place: seq {seq} where {expected}"
                                             " was due (inserted, duplicated or reordered)")
                    return report
                if prev.encode() != prev_hash:
                    report.problem = Problem(prev_place[0], prev_place[1],
                                             f"entry altered: its hash differs from the one {file.name}"
                                             f":{n} records (or that entry's prev was altered)")
                    return report
            if report.first_seq is None:
                report.first_seq = seq
            # Checkpoints older than the oldest kept entry belong to rotated-away files.
            while cps.current is not None and int(cps.current[1]["seq"]) < seq:
                if int(cps.current[1]["seq"]) >= report.first_seq:
                    report.problem = Problem(file.name, n, "a checkpointed entry is missing before this line")
                    return report
                report.problem = cps.advance()
                if report.problem:
                    return report
            if cps.current is not None and int(cps.current[1]["seq"]) == seq:
                if cps.current[1]["hash"] != digest.decode():
                    report.problem = Problem(file.name, n, f"entry altered: its hash differs from checkpoint "
                                             f"{cps.path.name}:{cps.current[0]}")
                    return report
                report.problem = cps.advance()
                if report.problem:
                    return report
            report.entries += 1
            report.last_seq = seq
            expected, prev_hash, prev_place = seq + 1, digest, (file.name, n)
    if cps.current is not None:
        file_name, line_no = prev_place or (base.name, 0)
        report.problem = Problem(file_name, line_no or None,
                                 f"trail truncated: it ends at seq {report.last_seq} but checkpoint "
                                 f"{cps.path.name}:{cps.current[0]} covers seq {cps.current[1]['seq']}")
        return report
    if public is not None and unsigned_anchor and cps.first_signed_seq is not None \
            and cps.first_signed_seq <= anchor_seq:
        # The writer signed before it dropped these files: its anchor was signed too.
        report.problem = Problem(anchor_path(base).name, None,
                                 "unsigned anchor after signed checkpoints (signature stripped: altered)")
    elif public is not None and require_signed and report.entries and not report.signed_checkpoints:
        report.problem = Problem(base.name, None, "no signed checkpoint covers this chain")
    return report


def verify_dir(directory: str | Path, public: Ed25519PublicKey | None = None, *,
               require_signed: bool = False) -> list[ChainReport]:
    """Verify every chain in ``directory``."""
    return [verify_chain(base, public, require_signed=require_signed) for base in chain_bases(directory)]
