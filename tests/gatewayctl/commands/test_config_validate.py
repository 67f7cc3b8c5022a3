"""``mcp-gateway config validate``: production configs checked without their secrets (--no-files),
and a rejected render kept where the operator can read it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gatewayctl import cli
from gatewayctl.commands import stack
from gatewayctl.envoy_config import stand_in_missing_files
from tests.e2e.helpers import REPO

CLI = [sys.executable, "-m", "gatewayctl.cli"]
K8S = REPO / "deploy/k8s/gateway.yaml"


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          check=False)


def test_a_production_config_validates_without_its_certificates() -> None:
    """The Kubernetes config names certificates mounted from a Secret: without --no-files the
    check stops at the missing file; with it, Envoy checks everything else with stand-ins."""
    plain = run("--config", str(K8S), "config", "validate", "--ext-proc", "on")
    assert plain.returncode == 1 and "does not exist" in plain.stderr
    stood_in = run("--config", str(K8S), "config", "validate", "--no-files", "--ext-proc", "on")
    assert stood_in.returncode == 0, stood_in.stderr
    # The certificate files are named in the edge SDS file (tls.sds_file), which stands in whole.
    assert re.search(r"checked with a stand-in: /etc/\S+\.(pem|yaml)", stood_in.stdout)
    assert "is valid" in stood_in.stdout


def test_stand_ins_replace_only_missing_files(tmp_path: Path) -> None:
    present = tmp_path / "present.pem"
    present.write_text("x")
    text = yaml.safe_dump({"tls": {"tls_certificates": [
        {"certificate_chain": {"filename": str(present)},
         "private_key": {"filename": "/nowhere/key.pem"}}],
        "validation_context": {"trusted_ca": {"filename": "/nowhere/ca.pem"}}}})
    out, replaced = stand_in_missing_files(text, tmp_path / "stand-ins")
    doc = yaml.safe_load(out)
    pair = doc["tls"]["tls_certificates"][0]
    assert replaced == ["/nowhere/ca.pem", "/nowhere/key.pem"]
    assert pair["certificate_chain"]["filename"] == str(present)
    assert Path(pair["private_key"]["filename"]).read_text().startswith("-----BEGIN PRIVATE KEY")
    assert Path(doc["tls"]["validation_context"]["trusted_ca"]["filename"]).exists()
    assert stand_in_missing_files(out, tmp_path / "again") == (out, [])


def test_a_rejected_render_is_kept_and_named(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """When Envoy refuses the render, its message names a file that still exists, holding
    what Envoy read (it used to name a deleted temporary file)."""
    bad = "static_resources: {clusters: [{name: x, type: NOT_A_TYPE}]}\n"
    monkeypatch.setattr(stack, "_render_traced", lambda *args, **kwargs: (bad, ()))
    assert cli.main(["config", "validate"]) == 1
    err = capsys.readouterr().err
    kept = re.search(r"the rendered config is kept at (\S+)\)", err)
    assert kept, err
    path = Path(kept.group(1))
    try:
        assert "NOT_A_TYPE" in err and "rendered line 1:" in err
        assert path.read_text() == bad
    finally:
        shutil.rmtree(path.parent)
