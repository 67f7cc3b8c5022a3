"""``mcp-gateway audit verify|erase|export|hold|release|holds|prune``: the audit trail's integrity and data
subjects' rights (docs/compliance.md)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.telemetry.audit import AuditEntry, AuditUnavailable, AuditWriter, audit_files, retention_entry
from gateway.telemetry.audit_chain import CheckpointSigner, load_public_key
from gateway.telemetry.audit_keys import (
    PERSONAL_FIELDS,
    KeyStoreError,
    SubjectKeyStore,
    master_key_from_env,
    parse_master_key,
)
from gateway.telemetry.audit_retention import load_holds, prune_chain, prune_logs, set_hold
from gateway.telemetry.audit_verify import chain_bases, verify_dir

# The command line's own chain: erasures, holds and releases are audited like calls.
CLI_AUDIT_FILE = "mcp-gateway-cli.jsonl"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the audit trail: verify, erase, export")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser("verify", help="check every chain and checkpoint of the trail")
    verify.add_argument("--public-key", type=Path,
                        help="Ed25519 key (PEM) the checkpoints are signed with (default: audit.signing_key)")
    verify.add_argument("--require-signed", action="store_true",
                        help="fail chains without signed checkpoints (default: report them as unsigned)")
    erase = asub.add_parser("erase", help="crypto-shred a subject: their entries stay, unreadable")
    erase.add_argument("--sub", required=True, help="the subject (the token's sub)")
    export = asub.add_parser("export", help="everything the trail holds about a subject, as JSON lines")
    export.add_argument("--sub", required=True, help="the subject (the token's sub)")
    export.add_argument("--since", help="only entries at or after this RFC 3339 time (or date)")
    export.add_argument("--until", help="only entries before this RFC 3339 time (or date)")
    export.add_argument("-o", "--output", type=Path, help="write to this file (default: stdout)")
    for name, text in (("hold", "exempt from erasure and pruning until released"),
                       ("release", "end a legal hold")):
        p = asub.add_parser(name, help=text)
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--sub", help="a subject (kept in clear in legal-holds.json)")
        which.add_argument("--case", help="a case id (holds the whole trail)")
        if name == "hold":
            p.add_argument("--reason", help="a note kept with the hold")
    asub.add_parser("holds", help="list the legal holds")
    asub.add_parser("prune", help="remove files older than audit.retention_days (unless held)")
    for parser in asub.choices.values():
        parser.add_argument("--dir", type=Path,
                            help="the audit directory and its key store (default: audit.dir)")
    audit.set_defaults(func=run)


def master_key(config: GatewayConfig) -> bytes:
    """The master key: from the environment variable audit.master_key names, else the dev stack's
    generated secret in state_dir/secrets."""
    name = config.audit.master_key
    if name is None:
        raise KeyStoreError("audit.master_key is not set: personal fields are not sealed, nothing to do")
    key = master_key_from_env(name)  # the variable, or the file <name>_FILE names (docker compose)
    if key is not None:
        return key
    path = Path(config.state_dir) / "secrets" / name
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise KeyStoreError(f"audit.master_key: the secret {name} is neither in the environment "
                            f"(nor {name}_FILE) nor in {path}") from None
    return parse_master_key(value, f"audit.master_key ({name})")


def key_store(config: GatewayConfig) -> SubjectKeyStore:
    return SubjectKeyStore(config.audit.dir, master_key(config))


async def record(config: GatewayConfig, method: str, target: str, reason: str | None, status: str) -> None:
    """Append an audit entry about an administrative act to the command line's own chain."""
    signer = CheckpointSigner.from_file(config.audit.signing_key) if config.audit.signing_key else None
    async with AuditWriter(Path(config.audit.dir) / CLI_AUDIT_FILE, signer=signer) as writer:
        await writer.write(AuditEntry(method=method, server="audit", target=target, sub=None, client_id=None,
                                      tenant=None, decision="allow", reason=reason, status=status,
                                      latency_ms=None, request_id=None, decision_id=None,
                                      service="mcp-gateway-cli"))


def trail_entries(directory: Path) -> Iterator[dict[str, Any]]:
    """Every entry of every chain in ``directory``, one line at a time (torn lines skipped)."""
    for base in chain_bases(directory):
        for file in audit_files(base):
            with file.open("rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        continue
                    try:
                        entry = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(entry, dict):
                        yield entry


def export(config: GatewayConfig, sub: str, out: IO[bytes], since: str | None = None,
           until: str | None = None) -> tuple[int, int]:
    """Write ``sub``'s entries, opened, to ``out``: (entries written, entries whose key was erased)."""
    store = key_store(config) if config.audit.master_key else None
    sid = store.subject_id(sub) if store else None
    written = erased = 0
    try:
        for entry in trail_entries(Path(config.audit.dir)):
            ts = str(entry.get("ts", ""))
            if (since and ts < since) or (until and ts >= until):
                continue
            if sid is not None and entry.get("sid") == sid and store is not None:
                fields = store.open(entry)
                if fields is None or fields.get("sub") != sub:
                    erased += 1
                    continue
                entry = {k: v for k, v in entry.items() if k not in ("sid", "pii")} | fields
            elif entry.get("sub") != sub:
                continue
            out.write(orjson.dumps({k: entry.get(k) for k in (*entry, *PERSONAL_FIELDS)}) + b"\n")
            written += 1
    finally:
        if store is not None:
            store.close()
    return written, erased


def _public_key(args: argparse.Namespace, config: GatewayConfig) -> Ed25519PublicKey | None:
    path = args.public_key or (Path(config.audit.signing_key) if config.audit.signing_key else None)
    return load_public_key(path) if path is not None else None


def verify(args: argparse.Namespace, config: GatewayConfig) -> int:
    directory = Path(config.audit.dir)
    if not directory.is_dir():
        print(f"mcp-gateway audit verify: {directory} is not a directory (audit.dir)", file=sys.stderr)
        return 2
    public = _public_key(args, config)
    reports = verify_dir(directory, public, require_signed=args.require_signed)
    bad = 0
    for r in reports:
        if r.problem is not None:
            bad += 1
            print(f"FAIL {r.problem}")
            continue
        notes = [f"{r.entries} entries", f"{r.files} files"]
        if public is not None:
            notes.append(f"{r.signed_checkpoints} signed checkpoints")
            if r.unsigned_checkpoints:
                notes.append(f"UNSIGNED: {r.unsigned_checkpoints} checkpoints without a signature "
                             "(its writer has no signing key)")
        else:
            notes.append(f"{r.checkpoints} checkpoints (signatures not checked: no key)")
        if r.legacy:
            notes.append(f"{r.legacy} unchained entries from before schema 2")
        if r.torn_tail:
            notes.append("torn last line (crash during an append) ignored")
        print(f"ok   {r.base.name}: {', '.join(notes)}")
    if not reports:
        print(f"no audit chains in {directory}")
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mcp-gateway audit: {exc}", file=sys.stderr)
        return 2
    if args.dir is not None:  # e.g. one pod's folder on a shared volume
        config = dataclasses.replace(config, audit=dataclasses.replace(config.audit, dir=str(args.dir)))
    command = args.audit_command
    try:
        if command == "verify":
            return verify(args, config)
        if command == "export":
            if args.output:
                with args.output.open("wb") as f:
                    written, erased = export(config, args.sub, f, args.since, args.until)
            else:
                written, erased = export(config, args.sub, sys.stdout.buffer, args.since, args.until)
                sys.stdout.flush()
            note = f"; {erased} more are erased (unreadable)" if erased else ""
            print(f"exported {written} entries{note}", file=sys.stderr)
            return 0
        if command == "holds":
            for kind, held in load_holds(config.audit.dir).items():
                for value, info in held.items():
                    print(f"{kind}\t{value}\t{info.get('at')}\t{info.get('reason') or ''}")
            return 0
        if command == "prune":
            return prune(config)
        if command == "erase":
            return erase(args, config)
        return hold(args, config)
    except (OSError, ValueError, sqlite3.Error, AuditUnavailable) as exc:
        print(f"mcp-gateway audit {args.audit_command}: {exc}", file=sys.stderr)
        return 2


def erase(args: argparse.Namespace, config: GatewayConfig) -> int:
    """Destroy a subject's key (unless held), then audit the erasure (by pseudonym only)."""
    if args.sub in load_holds(config.audit.dir)["sub"]:
        print("mcp-gateway audit erase: the subject is under legal hold; release it first", file=sys.stderr)
        return 1
    store = key_store(config)
    try:
        sid, kid = store.erase(args.sub)
    finally:
        store.close()
    asyncio.run(record(config, "audit/erase", sid, f"key {kid}" if kid else "no key",
                       "ok" if kid else "no_key"))
    print(f"erased subject {sid}" + (f" (key {kid})" if kid else ": it had no key"))
    return 0


def hold(args: argparse.Namespace, config: GatewayConfig) -> int:
    """hold / release: change legal-holds.json, then audit the change (a subject by pseudonym)."""
    if args.sub:
        sid = None
        if config.audit.master_key:
            store = key_store(config)
            sid = store.subject_id(args.sub)
            store.close()
        kind, value, shown = "sub", args.sub, f"sub:{sid or '(subject)'}"
    else:
        kind, value, shown, sid = "case", args.case, f"case:{args.case}", None
    held = args.audit_command == "hold"
    changed = set_hold(config.audit.dir, kind, value, sid=sid, reason=getattr(args, "reason", None),
                       held=held)
    asyncio.run(record(config, f"audit/{args.audit_command}", shown, getattr(args, "reason", None),
                       "ok" if changed else "not_held"))
    print(f"{'held' if held else 'released'} {kind} {value}" if changed else f"no hold on {kind} {value}")
    return 0 if changed else 1


def prune(config: GatewayConfig) -> int:
    """Remove expired files of chains no running writer holds (running writers prune their own)."""
    log_days = config.audit.log_retention_days
    if log_days is not None:
        logs = Path(config.state_dir) / "logs"
        removed_logs = prune_logs(logs, log_days) if logs.is_dir() else []
        print(f"service logs: removed {len(removed_logs)} rotated log file(s) older than {log_days} days")
    days = config.audit.retention_days
    if days is None:
        print("mcp-gateway audit prune: audit.retention_days is not set: no audit file expires",
              file=sys.stderr)
        return 0
    signer = CheckpointSigner.from_file(config.audit.signing_key) if config.audit.signing_key else None
    directory = Path(config.audit.dir)
    for base in chain_bases(directory):
        lock = os.open(base.with_name(base.name + ".lock"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{base.name}: in use, its writer prunes it")
                continue
            removed = prune_chain(base, days, signer)
        finally:
            os.close(lock)
        if removed:
            names = ",".join(p.name for p, _ in removed)
            entry = retention_entry(base.name, names, removed[-1][1], days)
            asyncio.run(record(config, entry.method, entry.target or base.name, entry.reason, "ok"))
        print(f"{base.name}: removed {len(removed)} expired file(s)")
    return 0
