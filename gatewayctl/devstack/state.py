"""Where the dev stack keeps its files (everything under ``state_dir``), and its one error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config import GatewayConfig

PID_FILE = "stack.json"


class StackError(RuntimeError):
    """The dev stack cannot start, or a command cannot act on it; the message says why."""


@dataclass(frozen=True, slots=True)
class Paths:
    state_dir: Path

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.tls_dir / "ca.key"

    @property
    def signing_key(self) -> Path:
        return self.state_dir / "keys" / "dev-signing-key.pem"

    @property
    def jwks_root(self) -> Path:
        return self.state_dir / "jwks"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE

    @property
    def envoy_yaml(self) -> Path:
        return self.state_dir / "envoy.yaml"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"


def paths(config: GatewayConfig) -> Paths:
    return Paths(Path(config.state_dir))
