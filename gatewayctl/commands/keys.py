"""``mcp-gateway keys init|list|add|promote|retire``: the caller assertion's signing keys
(identity.keys and the published identity.jwks_file; rotation steps in docs/identity.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.assertion import KeyFileError, KeyRing
from gateway.config import ConfigError, load_config
from gatewayctl import assertion_keys

NEXT_STEP = {
    "add": "published, not signing yet: `mcp-gateway reload` (Envoy publishes the JWKS), wait at "
           "least as long as verifiers cache it, then `mcp-gateway keys promote`",
    "promote": "signing within a few seconds (ext_authz follows the key file); once the old "
               "assertions expired (ttl + leeway), `mcp-gateway keys retire`",
    "retire": "`mcp-gateway reload` so Envoy stops publishing the retired key(s)",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="the caller assertion's signing keys (rotation)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    ksub.add_parser("init", help="create the key file with one key (fails if it exists)")
    ksub.add_parser("list", help="the keys, the signing one first")
    ksub.add_parser("add", help="rotation step 1: a new key, published but not signing")
    promote = ksub.add_parser("promote", help="rotation step 2: the newest key (or --kid) signs")
    promote.add_argument("--kid", help="the key to promote (default: the newest)")
    ksub.add_parser("retire", help="rotation step 3: remove every key but the signing one")
    keys.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        identity = load_config(args.config).identity
    except ConfigError as exc:
        print(f"mcp-gateway keys: {exc}", file=sys.stderr)
        return 2
    command = args.keys_command
    try:
        if command == "init":
            print(f"created {identity.keys} with key {assertion_keys.init(identity)}")
        elif command == "list":
            ring = KeyRing.load(Path(identity.keys))
            for i, entry in enumerate(ring.keys):
                print(f"{entry.kid}\t{'signing' if i == 0 else 'published'}")
        elif command == "add":
            print(f"added {assertion_keys.add(identity)}: {NEXT_STEP['add']}")
        elif command == "promote":
            print(f"promoted {assertion_keys.promote(identity, args.kid)}: {NEXT_STEP['promote']}")
        else:
            retired = assertion_keys.retire(identity)
            print(f"retired {', '.join(retired) or 'nothing'}: {NEXT_STEP['retire']}")
    except (assertion_keys.KeysError, KeyFileError) as exc:
        print(f"mcp-gateway keys {command}: {exc}", file=sys.stderr)
        return 1
    if not identity.assertion:
        print("note: identity.assertion is off in this config: nothing signs with these keys",
              file=sys.stderr)
    return 0
