"""``mcp-gateway policy check``: compile and statically check a policy folder."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    check = sub.add_parser("check", help="compile and statically check the policy folder")
    check.add_argument("--dir", help="policy folder (default: policy.dir of the config)")
    check.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    return 0
