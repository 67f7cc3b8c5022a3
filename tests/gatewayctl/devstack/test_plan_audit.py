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


def test_servers_get_the_result_sync_mode_and_the_config_checks_it(tmp_path: Path) -> None:
    """Servers write their result entries with audit.result_sync (default interval: ext_authz's
    decision entry is each call's fsync), at audit.sync_interval_ms; ext_authz keeps audit.sync
    (default batch). A mode other than batch/interval is refused naming the key."""
    import pytest

    from gateway.config import ConfigError

    config = load_config(stack_config(tmp_path))
    assert (config.audit.sync, config.audit.result_sync, config.audit.sync_interval_ms) == \
        ("batch", "interval", 100)
    comp = next(c for c in devstack.plan(config, ext_proc=False) if c.name == "echo")
    argv = list(comp.argv)
    assert argv[argv.index("--audit-sync") + 1] == "interval"
    assert argv[argv.index("--audit-sync-interval-ms") + 1] == "100"
    strict = load_config(stack_config(tmp_path, extra={"audit": {"result_sync": "batch",
                                                                 "sync_interval_ms": 20}}))
    argv = list(next(c for c in devstack.plan(strict, ext_proc=False) if c.name == "echo").argv)
    assert argv[argv.index("--audit-sync") + 1] == "batch"
    assert argv[argv.index("--audit-sync-interval-ms") + 1] == "20"
    with pytest.raises(ConfigError, match="audit.sync must be 'batch' or 'interval'"):
        load_config(stack_config(tmp_path, extra={"audit": {"sync": "never"}}))
    with pytest.raises(ConfigError, match="audit.sync_interval_ms must be"):
        load_config(stack_config(tmp_path, extra={"audit": {"sync_interval_ms": 0}}))
