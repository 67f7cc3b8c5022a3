"""``mcp-gateway audit``: verify, erase and export on a real trail."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import orjson
import pytest
import yaml

from gateway.config import load_config
from gateway.telemetry.audit import AuditEntry, AuditWriter, args_digest, iter_audit_all
from gateway.telemetry.audit_chain import CheckpointSigner, generate_signing_key, load_public_key
from gateway.telemetry.audit_keys import new_master_key
from gatewayctl.cli import main
from gatewayctl.commands.audit import CLI_AUDIT_FILE, key_store
from gatewayctl.devstack.credentials import ensure_audit_key
from gatewayctl.devstack.state import StackError

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


MASTER = "MCP_GATEWAY_AUDIT_MASTER_KEY"


def sealed_trail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config with sealing on and a trail of alice's and bob's entries (alternating, 3 files)."""
    monkeypatch.setenv(MASTER, new_master_key())
    config = write_config(tmp_path, master_key=MASTER)
    raw = yaml.safe_load(config.read_text())
    raw["secrets"] = [*raw.get("secrets", []), MASTER]
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(config))
    store = key_store(cfg)
    signer = CheckpointSigner.from_file(tmp_path / "audit.key")

    async def write() -> None:
        async with AuditWriter(tmp_path / "audit" / "ext_authz-1.jsonl", signer=signer, keys=store,
                               max_bytes=3000, keep=20) as writer:
            for n in range(12):
                await writer.write(entry(n, "alice" if n % 2 == 0 else "bob"))

    asyncio.run(write())  # the command line runs its own event loop: the tests here run none
    store.close()
    return config


def export_lines(config: Path, sub: str, *extra: str) -> list[dict[str, object]]:
    out = config.parent / f"export-{sub}.jsonl"
    assert main(["--config", str(config), "audit", "export", "--sub", sub, "-o", str(out), *extra]) == 0
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def test_sealed_trail_holds_no_subject_and_exports_exactly_theirs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Personal fields are only in sealed form on disk; export returns exactly the subject's entries."""
    config = sealed_trail(tmp_path, monkeypatch)
    files = list((tmp_path / "audit").glob("ext_authz-1.jsonl*"))
    assert len(files) >= 3
    for file in files:
        data = file.read_bytes()
        # As JSON strings: the sealed blobs are base64, in which "bob" can occur by chance (and did),
        # but never a double quote.
        for value in (b'"alice"', b'"bob"', b'"vscode"', b'"acme"'):
            assert value not in data, value
    alice = export_lines(config, "alice")
    assert [e["request_id"] for e in alice] == [f"r{n}" for n in range(0, 12, 2)]
    assert all(e["sub"] == "alice" and e["client_id"] == "vscode" and e["tenant"] == "acme" for e in alice)
    assert alice[1]["args_digest"] == args_digest({"n": 2}) and "pii" not in alice[0]
    window = export_lines(config, "bob", "--since", str(alice[1]["ts"]), "--until", str(alice[4]["ts"]))
    assert [e["request_id"] for e in window] == ["r3", "r5", "r7"]


def test_erase_shreds_one_subject_and_the_trail_still_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """After `audit erase --sub alice` her entries are unreadable, bob's read back, verify passes,
    and the erasure is itself an audit entry."""
    config = sealed_trail(tmp_path, monkeypatch)
    assert main(["--config", str(config), "audit", "erase", "--sub", "alice"]) == 0
    assert export_lines(config, "alice") == []
    assert "6 more are erased" in capsys.readouterr().err
    assert [e["request_id"] for e in export_lines(config, "bob")] == [f"r{n}" for n in range(1, 12, 2)]
    store = key_store(load_config(str(config)))
    sid = store.subject_id("alice")
    sealed = [e for e in iter_audit_all(tmp_path / "audit" / "ext_authz-1.jsonl") if e["sid"] == sid]
    assert len(sealed) == 6 and all(store.open(e) is None for e in sealed)
    store.close()
    assert main(["--config", str(config), "audit", "verify"]) == 0
    (erasure,) = iter_audit_all(tmp_path / "audit" / CLI_AUDIT_FILE)
    assert erasure["method"] == "audit/erase" and erasure["target"] == sid and erasure["status"] == "ok"
    # Nowhere in clear: every field but the sealed blob (base64, where a name can occur by chance).
    assert not any("alice" in str(value) for key, value in erasure.items() if key != "pii")


def test_legal_hold_blocks_erasure_until_released(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subject under legal hold cannot be erased; after release the erasure goes through."""
    config = sealed_trail(tmp_path, monkeypatch)
    base = ["--config", str(config), "audit"]
    assert main([*base, "hold", "--sub", "alice", "--reason", "case 7"]) == 0
    assert main([*base, "erase", "--sub", "alice"]) == 1
    assert len(export_lines(config, "alice")) == 6
    assert main([*base, "release", "--sub", "alice"]) == 0
    assert main([*base, "erase", "--sub", "alice"]) == 0
    assert export_lines(config, "alice") == []
    methods = [e["method"] for e in iter_audit_all(tmp_path / "audit" / CLI_AUDIT_FILE)]
    assert methods == ["audit/hold", "audit/release", "audit/erase"]
    assert main([*base, "verify"]) == 0


def test_dev_stack_makes_the_checkpoint_key_under_state_dir_only(tmp_path: Path) -> None:
    """The dev stack creates a missing audit.signing_key under state_dir; elsewhere it must exist."""
    raw = yaml.safe_load((ROOT / "gateway" / "default_config.yaml").read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["audit"] = {"signing_key": str(tmp_path / "state" / "audit-signing.key")}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(raw))
    ensure_audit_key(load_config(str(tmp_path / "g.yaml")))
    assert load_public_key(tmp_path / "state" / "audit-signing.key")
    raw["audit"] = {"signing_key": str(tmp_path / "elsewhere.key")}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(StackError, match="audit.signing_key"):
        ensure_audit_key(load_config(str(tmp_path / "g.yaml")))


def test_prune_removes_expired_files_of_stopped_writers_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`audit prune` removes a stopped chain's expired files (recorded, verify passes), leaves a
    chain whose writer is running to that writer, and removes expired rotated service logs."""
    config = write_config(tmp_path, retention_days=7, log_retention_days=7)
    signer = CheckpointSigner.from_file(tmp_path / "audit.key")
    old = "2020-01-01T00:00:00.000000Z"
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    for name in ("ext_authz-0.log.20200101T000000", "ext_authz-0.log"):
        (logs / name).write_text("old\n")
        os.utime(logs / name, (0, 1_577_836_800))

    async def scenario() -> None:
        for name in ("stopped.jsonl", "live.jsonl"):
            async with AuditWriter(tmp_path / "audit" / name, signer=signer, max_bytes=1500, keep=50) as w:
                for n in range(10):
                    await w.write(dataclasses.replace(entry(n, "alice"), ts=old))
                await w.write(entry(10, "alice"))
        async with AuditWriter(tmp_path / "audit" / "live.jsonl", signer=signer, max_bytes=1500, keep=50):
            rc = await asyncio.to_thread(main, ["--config", str(config), "audit", "prune"])
            assert rc == 0

    asyncio.run(scenario())
    out = capsys.readouterr().out
    assert "live.jsonl: in use" in out and "stopped.jsonl: removed" in out
    assert "service logs: removed 1 rotated log file(s)" in out
    assert [p.name for p in logs.iterdir()] == ["ext_authz-0.log"]  # the live log stays
    stopped = [e["request_id"] for e in iter_audit_all(tmp_path / "audit" / "stopped.jsonl")]
    assert "r0" not in stopped and "r10" in stopped
    assert "r0" in [e["request_id"] for e in iter_audit_all(tmp_path / "audit" / "live.jsonl")]
    (note,) = iter_audit_all(tmp_path / "audit" / CLI_AUDIT_FILE)
    assert note["method"] == "audit/prune" and note["target"] == "stopped.jsonl"
    assert main(["--config", str(config), "audit", "verify"]) == 0
