"""The edge certificate through SDS (tls.sds_file): the real Envoy serves a renewed certificate
once its folder is updated the way the kubelet updates a Secret volume (cert-manager renewals in
deploy/k8s), with no restart; without tls.sds_file the rendering is the plain file pair."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import yaml

from gateway.config import parse_config
from gatewayctl.envoy_config import EDGE_CERTIFICATE_SECRET, edge_sds_document, find_envoy, render
from tests.e2e.helpers import stack_config, wait_until

PEM_NAMES = ("server.pem", "server.key")


def publish(folder: Path, leaf: trustme.LeafCert, version: int) -> None:
    """Write a certificate pair as the kubelet's atomic writer does: a new timestamped folder,
    then the ``..data`` symlink swapped onto it by rename; the files are symlinks through it."""
    stamp = folder / f"..2026_12_06_{version:02d}"
    stamp.mkdir()
    leaf.cert_chain_pems[0].write_to_path(str(stamp / "server.pem"))
    leaf.private_key_pem.write_to_path(str(stamp / "server.key"))
    tmp = folder / "..data_tmp"
    tmp.symlink_to(stamp.name)
    os.replace(tmp, folder / "..data")
    for name in PEM_NAMES:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")


def served_certificate(port: int, ca: trustme.CA) -> bytes | None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)
    except OSError:
        return None


@pytest.fixture
def envoy_with_sds(tmp_path: Path) -> Iterator[tuple[int, Path, trustme.CA]]:
    ca = trustme.CA()
    folder = tmp_path / "tls"
    path = stack_config(tmp_path, extra={"tls": {"cert_file": str(folder / "server.pem"),
                                                  "key_file": str(folder / "server.key"),
                                                  "sds_file": str(tmp_path / "edge-sds.yaml")}})
    # Rendered before the volume exists, as render_configmaps.py renders for Kubernetes: the
    # config resolves paths, and a resolved symlink would pin the first ..<timestamp> folder.
    config = parse_config(yaml.safe_load(path.read_text()), base_dir=tmp_path)
    folder.mkdir()
    publish(folder, ca.issue_cert("127.0.0.1"), 1)
    sds = edge_sds_document(config)
    assert sds is not None
    (tmp_path / "edge-sds.yaml").write_text(sds, encoding="utf-8")
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(render(config), encoding="utf-8")
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen([str(find_envoy()), "-c", str(bootstrap), "--disable-hot-restart",
                             "--concurrency", "1", "--log-level", "warn"], stdout=log, stderr=log)
    try:
        yield config.listen.port, folder, ca
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_a_renewed_secret_volume_is_served_without_a_restart(
        envoy_with_sds: tuple[int, Path, trustme.CA]) -> None:
    """Envoy serves the first certificate; after the folder's ..data swap to a renewed one, new
    connections get the renewed certificate from the same Envoy process."""
    port, folder, ca = envoy_with_sds
    first = (folder / "server.pem").read_bytes()
    wait_until(lambda: served_certificate(port, ca) is not None, "Envoy's TLS listener", timeout=30)
    assert served_certificate(port, ca) == ssl.PEM_cert_to_DER_cert(first.decode())
    renewed = ca.issue_cert("127.0.0.1")
    publish(folder, renewed, 2)
    expected = ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())
    wait_until(lambda: served_certificate(port, ca) == expected, "the renewed certificate", timeout=20)


def test_the_sds_rendering_names_the_file_and_watches_the_folder(tmp_path: Path) -> None:
    """With tls.sds_file the listener takes the secret from that file, which names the files and
    watches their folder; without it the listener names the files directly."""
    path = stack_config(tmp_path, extra={"tls": {"cert_file": "/etc/envoy/tls/server.pem",
                                                  "key_file": "/etc/envoy/tls/server.key",
                                                  "sds_file": "/etc/envoy/config/edge-sds.yaml"}})
    config = parse_config(yaml.safe_load(path.read_text()), base_dir=tmp_path)
    listener = yaml.safe_load(render(config))["static_resources"]["listeners"][0]
    context = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert "tls_certificates" not in context
    [secret] = context["tls_certificate_sds_secret_configs"]
    assert secret["name"] == EDGE_CERTIFICATE_SECRET
    assert secret["sds_config"]["path_config_source"]["path"] == "/etc/envoy/config/edge-sds.yaml"
    sds = edge_sds_document(config)
    assert sds is not None
    [resource] = yaml.safe_load(sds)["resources"]
    assert resource["tls_certificate"]["watched_directory"] == {"path": "/etc/envoy/tls"}
    assert resource["tls_certificate"]["certificate_chain"] == {"filename": "/etc/envoy/tls/server.pem"}
    plain = parse_config({**yaml.safe_load(path.read_text()),
                          "tls": {"cert_file": "/x/server.pem", "key_file": "/x/server.key"}},
                         base_dir=tmp_path)
    context = yaml.safe_load(render(plain))["static_resources"]["listeners"][0]["filter_chains"][0][
        "transport_socket"]["typed_config"]["common_tls_context"]
    assert context["tls_certificates"] == [{"certificate_chain": {"filename": "/x/server.pem"},
                                            "private_key": {"filename": "/x/server.key"}}]
    assert edge_sds_document(plain) is None
