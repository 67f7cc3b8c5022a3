"""The dev stack hands each module server the audit options ext_authz gets."""

from __future__ import annotations

from pathlib import Path

from gateway.config import load_config
from gatewayctl import devstack
from tests.e2e.helpers import stack_config

MASTER = "MCP_GATEWAY_AUDIT_MASTER_KEY"


def test_servers_sign_and_seal_with_the_stacks_keys(tmp_path: Path) -> None:
    """With audit.signing_key and audit.master_key set, every server instance gets the key file,
    the master key's secret name and that secret, its file in audit.dir (the key store's folder)."""
    audit = {"dir": str(tmp_path / "audit"), "signing_key": str(tmp_path / "state" / "audit.key"),
             "master_key": MASTER, "checkpoint_seconds": 7, "retention_days": 30}
    config = load_config(stack_config(tmp_path, extra={"secrets": [MASTER], "audit": audit}))
    servers = [c for c in devstack.plan(config, ext_proc=False) if c.name == "echo"]
    assert len(servers) == 2
    for comp in servers:
        argv = list(comp.argv)
        flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--audit-")}
        assert flags["--audit-file"] == str(tmp_path / "audit" / f"echo-{comp.port}.jsonl")
        assert flags["--audit-signing-key"] == audit["signing_key"]
        assert flags["--audit-master-key-env"] == MASTER and MASTER in comp.env
        assert float(flags["--audit-checkpoint-seconds"]) == 7 and flags["--audit-retention-days"] == "30"
    plain = load_config(stack_config(tmp_path))
    comp = next(c for c in devstack.plan(plain, ext_proc=False) if c.name == "echo")
    assert "--audit-signing-key" not in comp.argv and "--audit-master-key-env" not in comp.argv
    assert MASTER not in comp.env
