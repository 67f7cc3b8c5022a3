"""``mcp-gateway policy check``: compile and statically check a policy folder.

Prints one ``file:line: message (kind)`` per finding (``--json``: one JSON document). Exit 0 when
no error was found (warnings such as an unused rule print but pass, unless ``--strict``), 1 on
any error, 2 on a usage or config error (no such folder, a config that does not load).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load_config
from gateway.policy.rego import ENTRYPOINT_RE
from gateway.policy.static import describe, is_warning, run_check


def add_parser(sub: Any) -> None:
    check = sub.add_parser("check", help="compile and statically check the policy folder")
    check.add_argument("--dir", help="policy folder (default: policy.dir of the config)")
    check.add_argument("--entrypoint", help="the decision rule, e.g. mcp/authz/decision "
                       "(default: policy.entrypoint of the config)")
    check.add_argument("--json", action="store_true", help="print the findings as one JSON document")
    check.add_argument("--strict", action="store_true", help="warnings (an unused rule) fail too")
    check.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    policy_dir = args.dir or cfg.policy.dir
    entrypoint = args.entrypoint or cfg.policy.entrypoint
    if not Path(policy_dir).is_dir():
        print(f"ERROR: policy folder {policy_dir} does not exist or is not a folder", file=sys.stderr)
        return 2
    if not ENTRYPOINT_RE.match(entrypoint):
        print(f"ERROR: entrypoint {entrypoint!r} is not a path like mcp/authz/decision", file=sys.stderr)
        return 2
    findings = run_check(policy_dir, entrypoint)
    warnings = sum(map(is_warning, findings))
    failed = len(findings) - warnings + (warnings if args.strict else 0)
    if args.json:
        print(json.dumps({
            "dir": str(policy_dir),
            "entrypoint": entrypoint,
            "ok": not failed,
            "errors": len(findings) - warnings,
            "warnings": warnings,
            "findings": [{"file": f.file, "line": f.line, "kind": f.kind, "message": f.message,
                          "severity": "warning" if is_warning(f) else "error"} for f in findings],
        }, indent=2))
    else:
        for f in findings:
            print(describe(f))
        summary = (f"{len(findings) - warnings} error(s), {warnings} warning(s)" if findings
                   else "no problems found")
        print(f"policy check {policy_dir}: {summary}", file=sys.stderr)
    return 1 if failed else 0
