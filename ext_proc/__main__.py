"""``python -m ext_proc [--config FILE] [--port N] [--host H]``: run one ext_proc instance."""

from __future__ import annotations

# regopy first: loaded after another C++ extension (grpc, aiohttp's frozenlist) its
# librego_shared.so leaks ~18 KB per policy evaluation (benchmarks: RSS grew without bound).
import regopy  # noqa: F401, I001  isort: skip

import argparse

from ext_proc.app import serve
from ext_proc.settings import Settings
from gateway import eventloop
from gateway.config import load_config
from gateway.policy.factory import build_engine
from gateway.telemetry.logs import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ext_proc", description=__doc__)
    parser.add_argument("--config", help="gateway config file (default: the embedded dev config)")
    parser.add_argument("--port", type=int, help="listen port (default: first ext_proc instance)")
    parser.add_argument("--host", help="listen address (default: from the config)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    configure_logging("ext_proc", cfg.telemetry.log_level)  # JSON lines on stderr
    settings = Settings.from_config(cfg, port=args.port, host=args.host)
    engine = build_engine(cfg.policy, extra_entrypoints=tuple(settings.list_entrypoints.values()))
    eventloop.run(serve(settings, engine))


if __name__ == "__main__":
    main()
