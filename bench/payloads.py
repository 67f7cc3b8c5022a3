"""The workload payloads shared by the backend and the load generator (deterministic)."""

from __future__ import annotations

import json
from typing import Any

_WORDS = ("order invoice shipped pending refund account region quarter revenue total amount "
          "summary status customer contact note").split()

# Fake but well-formed PII: the kinds the gateway masks (emails, phone numbers, Luhn-valid
# card numbers) sprinkled through report-like prose.
_EMAILS = ("jane.doe@example.com", "j.smith@example.org", "ops-team@corp.example")
_PHONES = ("+44 20 7946 0958", "(650) 253-0000", "+1 415 555 0132")
_CARDS = ("4111 1111 1111 1111", "5500 0000 0000 0004", "3400 000000 00009")

REPORT_BYTES = 10 * 1024


def echo_arguments() -> dict[str, Any]:
    """About 1 KB of tools/call arguments."""
    text = " ".join(_WORDS[i % len(_WORDS)] for i in range(120))
    return {"message": text[:900], "priority": 3, "tags": ["bench", "echo", "mcp"],
            "options": {"dry_run": False, "locale": "en-GB", "limit": 25}}


def echo_arguments_json() -> str:
    return json.dumps(echo_arguments(), separators=(",", ":"))


def report_text(size: int = REPORT_BYTES) -> str:
    """``size`` bytes (roughly) of report lines; every third line carries PII."""
    lines: list[str] = []
    n = total = 0
    while total < size:
        words = " ".join(_WORDS[(n * 7 + k) % len(_WORDS)] for k in range(8))
        line = f"{n:05d} {words} amount={n * 37 % 10000}.{n % 100:02d}"
        if n % 3 == 0:
            line += (f" contact {_EMAILS[n % 3]} phone {_PHONES[(n // 3) % 3]}"
                     f" card {_CARDS[(n // 9) % 3]}")
        lines.append(line)
        total += len(line) + 1
        n += 1
    return "\n".join(lines)
