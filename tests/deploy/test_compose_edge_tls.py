"""docker compose: Envoy's edge certificate reaches Envoy's user. The host folder
(MCP_GATEWAY_TLS_DIR, made by `mcp-gateway up` with a 0600 key of the host user) is mounted only
by pki-init, which copies the pair into a volume owned by Envoy's container user."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatewayctl import compose_init
from gatewayctl.devstack.state import StackError
from tests.deploy.test_compose_inner_tls import issue, mounts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    result: dict[str, dict[str, Any]] = loaded["services"]
    return result


def test_envoy_reads_the_edge_pair_from_pki_inits_volume(services: dict[str, dict[str, Any]]) -> None:
    """Envoy mounts the edge-tls volume, not the host folder; pki-init mounts both and is told to
    copy one into the other."""
    envoy, init = mounts(services["envoy"]), mounts(services["pki-init"])
    assert envoy["/etc/envoy/tls"] == ("edge-tls", "ro")
    assert "${MCP_GATEWAY_TLS_DIR:-./.run/tls}:/edge-src:ro" in services["pki-init"]["volumes"]
    assert init["/out/edge"][0] == "edge-tls"
    entry = services["pki-init"]["entrypoint"]
    assert entry[entry.index("--edge-src") + 1] == "/edge-src"
    assert entry[entry.index("--edge-out") + 1] == "/out/edge"
    assert "edge-tls" in yaml.safe_load((REPO / "docker-compose.yml").read_text())["volumes"]
    assert not any("MCP_GATEWAY_TLS_DIR" in v for v in services["envoy"]["volumes"])


def test_pki_init_copies_the_edge_pair_private_to_envoy(tmp_path: Path) -> None:
    """The key arrives 0600 and the certificate 0644 in a 0700 folder, byte for byte; a second
    run changes nothing; a missing key is an error naming it."""
    from gateway.config import load_config

    config = load_config(REPO / "deploy" / "compose" / "gateway.yaml")
    src, edge = tmp_path / "host-tls", tmp_path / "out" / "edge"
    src.mkdir()
    edge.mkdir(parents=True)
    (src / "server.pem").write_bytes(b"CERT")
    (src / "server.key").write_bytes(b"KEY")
    out = issue(tmp_path, config, "--edge-src", str(src), "--edge-out", str(edge))
    assert out / "edge" == edge
    assert (edge / "server.key").read_bytes() == b"KEY"
    assert (edge / "server.pem").read_bytes() == b"CERT"
    assert stat.S_IMODE((edge / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((edge / "server.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE(edge.stat().st_mode) == 0o700
    uid = os.geteuid()
    assert compose_init.hand_out_edge(src, edge, envoy_uid=uid) is False
    (src / "server.key").unlink()
    with pytest.raises(StackError, match="server.key"):
        compose_init.hand_out_edge(src, edge, envoy_uid=uid)


def test_edge_flags_go_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--edge-src without --edge-out is a usage error."""
    with pytest.raises(SystemExit) as exited:
        compose_init.main(["--config", "x", "--pki", str(tmp_path), "--out", str(tmp_path),
                           "--edge-src", str(tmp_path)])
    assert exited.value.code == 2 and "go together" in capsys.readouterr().err
