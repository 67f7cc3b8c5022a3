"""Envoy's restarter for the dev stack: the parent every Envoy of one stack runs under.

Envoy with hot restart on asks the kernel to stop it when the process that started it exits
(``PR_SET_PDEATHSIG``): it expects a restarter that stays. This is ours (the same contract as
Envoy's own ``hot-restarter.py``):

* it starts Envoy with ``--restart-epoch 0`` and stays its parent;
* SIGHUP starts the next epoch: the new Envoy takes the listening sockets over from the running
  one, which drains and exits by itself (``--drain-time-s``, ``--parent-shutdown-time-s``);
* a new Envoy that fails leaves the old one serving; the failed epoch is written to
  ``<state dir>/envoy-restarter.json`` for ``mcp-gateway reload`` to report;
* SIGTERM or SIGINT stops every Envoy, and the restarter exits once none is left (also when the
  last Envoy exits by itself, with its exit code).

    python -m gatewayctl.envoy_restarter --state-dir DIR -- ENVOY_BINARY ARGS...
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

STATUS_FILE = "envoy-restarter.json"
WAIT_SECONDS = 0.2


def failed_epoch(state_dir: Path | str) -> int | None:
    """The newest epoch that failed to start, as the restarter recorded it (None: none)."""
    try:
        data = json.loads((Path(state_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("failed_epoch")
    return value if isinstance(value, int) else None


class Restarter:
    def __init__(self, argv: Sequence[str], state_dir: Path) -> None:
        self.argv = list(argv)
        self.status = state_dir / STATUS_FILE
        self.children: dict[int, subprocess.Popen[bytes]] = {}  # epoch -> Envoy
        self.epoch = -1
        self.restart = threading.Event()
        self.stop = threading.Event()
        self.wake = threading.Event()  # set by the signal handlers: look again now
        self.failed: int | None = None

    def signal(self, flag: threading.Event) -> None:
        flag.set()
        self.wake.set()

    def _write_status(self) -> None:
        tmp = self.status.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": self.epoch, "failed_epoch": self.failed,
                                   "pids": {str(e): p.pid for e, p in self.children.items()}}),
                       encoding="utf-8")
        tmp.replace(self.status)

    def _start_next(self) -> None:
        self.epoch += 1
        # The child inherits stdout/stderr (the stack's Envoy log) and this process group, so
        # `mcp-gateway down` (a signal to the group) reaches every Envoy.
        self.children[self.epoch] = subprocess.Popen(
            [*self.argv, "--restart-epoch", str(self.epoch)], stdin=subprocess.DEVNULL)
        print(f"envoy restarter: started restart epoch {self.epoch} "
              f"(pid {self.children[self.epoch].pid})", flush=True)
        self._write_status()

    def run(self) -> int:
        self._start_next()
        code = 0
        while True:
            if self.stop.is_set():
                for child in self.children.values():
                    if child.poll() is None:
                        child.send_signal(signal.SIGTERM)
            elif self.restart.is_set():
                self.restart.clear()
                self._start_next()
            for epoch, child in list(self.children.items()):
                if child.poll() is None:
                    continue
                del self.children[epoch]
                code = child.returncode
                newest = epoch == self.epoch
                if newest and code != 0 and self.children and not self.stop.is_set():
                    self.failed = epoch  # a hot restart that did not take: the old one serves
                print(f"envoy restarter: restart epoch {epoch} exited with code {code}", flush=True)
                self._write_status()
            if not self.children:
                return code if code >= 0 else 128 - code
            self.wake.wait(WAIT_SECONDS)
            self.wake.clear()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gatewayctl.envoy_restarter")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("envoy", nargs=argparse.REMAINDER, help="-- ENVOY_BINARY ARGS...")
    args = parser.parse_args(argv)
    envoy = args.envoy[1:] if args.envoy[:1] == ["--"] else args.envoy
    if not envoy:
        parser.error("the Envoy command line follows --")
    restarter = Restarter(envoy, args.state_dir)
    signal.signal(signal.SIGHUP, lambda *_: restarter.signal(restarter.restart))
    signal.signal(signal.SIGTERM, lambda *_: restarter.signal(restarter.stop))
    signal.signal(signal.SIGINT, lambda *_: restarter.signal(restarter.stop))
    return restarter.run()


if __name__ == "__main__":
    sys.exit(main())
