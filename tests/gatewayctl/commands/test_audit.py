"""``mcp-gateway audit``: verify, erase and export on a real trail."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.telemetry.audit import AuditEntry, AuditWriter, args_digest
from gateway.telemetry.audit_chain import CheckpointSigner, generate_signing_key
from gatewayctl.cli import main

ROOT = Path(__file__).resolve().parents[3]


def entry(n: int, sub: str) -> AuditEntry:
    return AuditEntry(method="tools/call", server="files", target="read_file", sub=sub, client_id="vscode",
                      tenant="acme", decision="allow", reason=None, status="ok", latency_ms=1.0,
                      request_id=f"r{n}", decision_id=f"d{n}", args_digest=args_digest({"n": n}))


def write_config(tmp_path: Path, **audit: object) -> Path:
    """The default config with the audit trail (and its keys) under ``tmp_path``."""
    raw = yaml.safe_load((ROOT / "gateway" / "default_config.yaml").read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["audit"] = {"dir": str(tmp_path / "audit"), "signing_key": str(tmp_path / "audit.key"), **audit}
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(raw))
    generate_signing_key(tmp_path / "audit.key")
    return config


async def test_verify_reports_ok_then_the_altered_line(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`audit verify` exits 0 on a clean trail and 1 naming file and line after an edit."""
    config = write_config(tmp_path)
    path = tmp_path / "audit" / "ext_authz-1.jsonl"
    async with AuditWriter(path, signer=CheckpointSigner.from_file(tmp_path / "audit.key")) as writer:
        for n in range(5):
            await writer.write(entry(n, "alice"))
    assert main(["--config", str(config), "audit", "verify"]) == 0
    assert "ok   ext_authz-1.jsonl: 5 entries" in capsys.readouterr().out
    data = path.read_bytes().splitlines(keepends=True)
    data[1] = data[1].replace(b'"allow"', b'"deny!"')
    path.write_bytes(b"".join(data))
    assert main(["--config", str(config), "audit", "verify", "--dir", str(tmp_path / "audit")]) == 1
    assert "FAIL ext_authz-1.jsonl:2: entry altered" in capsys.readouterr().out
