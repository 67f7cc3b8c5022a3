"""``python -m gateway.console [--config FILE] [--host H] [--port P]``: run the web console."""

from __future__ import annotations

# regopy first: loaded after another C++ extension its shared library leaks per evaluation
# (see ext_authz/__main__.py).
import regopy  # noqa: F401, I001  isort: skip

import sys

from gateway import eventloop
from gateway.config import ConfigError
from gateway.console.app import run
from gateway.console.settings import ConsoleSettings
from gateway.telemetry import configure_logging


def main(argv: list[str] | None = None) -> None:
    try:
        settings = ConsoleSettings.from_argv(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        raise SystemExit(f"gateway.console: {exc}") from None
    configure_logging("console", settings.log_level)
    eventloop.run(run(settings))


if __name__ == "__main__":
    main()
