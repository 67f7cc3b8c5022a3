"""``python -m ext_authz [--config FILE] [--port N] [--host H]``: run one ext_authz instance."""

from __future__ import annotations

# regopy first: loaded after another C++ extension (grpc, aiohttp's frozenlist) its
# librego_shared.so leaks ~18 KB per policy evaluation (benchmarks: RSS grew without bound).
import regopy  # noqa: F401, I001  isort: skip

import argparse

from ext_authz.app import serve
from ext_authz.decision_log import configure_stdout
from ext_authz.settings import Settings
from gateway import eventloop
from gateway.config import load_config
from gateway.policy.factory import build_engine
from gateway.telemetry import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ext_authz", description=__doc__)
    parser.add_argument("--config", help="gateway config file (default: the embedded dev config)")
    parser.add_argument("--port", type=int, help="listen port (default: first ext_authz instance)")
    parser.add_argument("--host", help="listen address (default: from the config)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    configure_logging("ext_authz", cfg.telemetry.log_level)  # JSON lines on stderr
    configure_stdout()
    settings = Settings.from_config(cfg, port=args.port, host=args.host)
    eventloop.run(serve(settings, build_engine(cfg.policy)))


if __name__ == "__main__":
    main()
