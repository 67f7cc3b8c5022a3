"""``mcp-gateway audit verify|erase|export``: the audit trail's integrity and data subjects' rights
(docs/compliance.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.telemetry.audit_chain import load_public_key
from gateway.telemetry.audit_verify import verify_dir


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the audit trail: verify, erase, export")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser("verify", help="check every chain and checkpoint of the trail")
    verify.add_argument("--dir", type=Path, help="the audit directory (default: audit.dir)")
    verify.add_argument("--public-key", type=Path,
                        help="Ed25519 key (PEM) the checkpoints are signed with (default: audit.signing_key)")
    audit.set_defaults(func=run)


def _public_key(args: argparse.Namespace, config: GatewayConfig) -> Ed25519PublicKey | None:
    path = args.public_key or (Path(config.audit.signing_key) if config.audit.signing_key else None)
    return load_public_key(path) if path is not None else None


def verify(args: argparse.Namespace, config: GatewayConfig) -> int:
    directory = args.dir or Path(config.audit.dir)
    if not directory.is_dir():
        print(f"mcp-gateway audit verify: {directory} is not a directory (audit.dir)", file=sys.stderr)
        return 2
    public = _public_key(args, config)
    reports = verify_dir(directory, public)
    bad = 0
    for r in reports:
        if r.problem is not None:
            bad += 1
            print(f"FAIL {r.problem}")
            continue
        notes = [f"{r.entries} entries", f"{r.files} files",
                 f"{r.signed_checkpoints if public else r.checkpoints} "
                 f"{'signed ' if public else 'unsigned-checked '}checkpoints"]
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
    try:
        return verify(args, config)
    except (OSError, ValueError) as exc:
        print(f"mcp-gateway audit {args.audit_command}: {exc}", file=sys.stderr)
        return 2
