"""Runtimes of command servers: the third-party program a stdio server runs, installed from its
registry into a folder of its own, never into the gateway's environment.

* ``pip``: ``python -m venv <dir>/venv`` from the base interpreter (not the gateway's venv), then
  ``pip install`` of the specs into that venv; its ``bin`` goes first on the bridge's PATH.
* ``npm``: ``npm install --prefix <dir>``; ``<dir>/node_modules/.bin`` goes first on PATH, followed
  by the folder of the ``node`` that runs npm's scripts (package bins start with
  ``#!/usr/bin/env node``).

``<dir>`` is ``<state_dir>/runtimes/<server>``, or ``$MCP_GATEWAY_RUNTIME_CACHE/<spec hash>``
when that variable names a folder (tests share one install across stacks). A stamp file in
``<dir>`` holds the hash of the spec: an unchanged runtime is reused, a changed one is
reinstalled from scratch. Installs of one folder are serialised with a lock file next to it, so
two stacks sharing the cache do not install into each other. Installer output goes to
``<state_dir>/logs/runtime-<server>.log``; a failure raises StackError naming
``servers.<server>.runtime`` and that log.

Everything but ``ensure`` is pure (or only looks at the file system), so the process plan can
compute a bridge's PATH without installing anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from gateway.config import GatewayConfig, RuntimeConfig, ServerConfig
from gatewayctl.devstack.state import StackError, paths

CACHE_ENV = "MCP_GATEWAY_RUNTIME_CACHE"
STAMP = ".stamp"
INSTALL_TIMEOUT_SECONDS = 900.0
# Variables of ours that would reach into the runtime's interpreter or installer.
_INSTALL_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


def spec_hash(runtime: RuntimeConfig) -> str:
    """A stable hash of what gets installed. A venv is tied to the interpreter's minor version,
    so a pip runtime's hash includes it."""
    material: dict[str, object] = {"kind": runtime.kind, "packages": list(runtime.packages)}
    if runtime.kind == "pip":
        material["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _runtime(server: ServerConfig) -> RuntimeConfig:
    if server.runtime is None:
        raise ValueError(f"servers.{server.name} has no runtime")
    return server.runtime


def runtime_dir(config: GatewayConfig, server: ServerConfig,
                environ: Mapping[str, str] | None = None) -> Path:
    """Where ``server``'s runtime lives: the shared cache when $MCP_GATEWAY_RUNTIME_CACHE is set,
    else under the stack's state_dir."""
    environ = os.environ if environ is None else environ
    cache = environ.get(CACHE_ENV)
    if cache:
        return Path(cache).resolve() / spec_hash(_runtime(server))[:24]
    return paths(config).state_dir / "runtimes" / server.name


def base_python() -> str:
    """The interpreter a runtime's venv is made from: the one the gateway's venv was made from."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def node_folder(search_path: str | None = None) -> Path | None:
    """The folder of the ``node`` npm runs its scripts with: the first ``node`` on PATH (npm
    itself starts with ``#!/usr/bin/env node``), else the one next to ``npm``."""
    node = shutil.which("node", path=search_path)
    if node is not None:
        return Path(node).parent
    npm = shutil.which("npm", path=search_path)
    if npm is not None and (Path(npm).resolve().parent / "node").is_file():
        return Path(npm).resolve().parent
    return None


def bin_dirs(runtime: RuntimeConfig, directory: Path, search_path: str | None = None
             ) -> tuple[str, ...]:
    """The folders put first on the bridge's PATH (and so on the child's), in order."""
    if runtime.kind == "pip":
        return (str(directory / "venv" / "bin"),)
    node = node_folder(search_path)
    return (str(directory / "node_modules" / ".bin"), *((str(node),) if node is not None else ()))


def install_commands(runtime: RuntimeConfig, directory: Path, *, python: str | None = None,
                     npm: str = "npm") -> list[list[str]]:
    """The argv of each install step, in order (pure). The specs come after ``--`` as well as
    being refused when they start with '-' (gateway.config), so none is read as an option."""
    if runtime.kind == "pip":
        venv = directory / "venv"
        return [[python or base_python(), "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                 "--no-input", "--", *runtime.packages]]
    if runtime.kind == "npm":
        return [[npm, "install", "--prefix", str(directory), "--no-audit", "--no-fund", "--",
                 *runtime.packages]]
    raise ValueError(f"unknown runtime kind {runtime.kind!r}")


def search_path(config: GatewayConfig, server: ServerConfig,
                environ: Mapping[str, str] | None = None) -> str:
    """The PATH ``server``'s bridge (and so its child) gets: the runtime's bin folders first."""
    environ = os.environ if environ is None else environ
    rest = environ.get("PATH", os.defpath)
    if server.runtime is None:
        return rest
    dirs = bin_dirs(server.runtime, runtime_dir(config, server, environ), rest)
    return os.pathsep.join([*dirs, rest])


def log_file(config: GatewayConfig, server: ServerConfig) -> Path:
    return paths(config).logs / f"runtime-{server.name}.log"


def _installed(directory: Path, want: str) -> bool:
    try:
        return (directory / STAMP).read_text(encoding="utf-8").strip() == want
    except OSError:
        return False


def ensure(config: GatewayConfig, server: ServerConfig,
           environ: Mapping[str, str] | None = None,
           notify: Callable[[str], None] | None = None) -> Path:
    """Install ``server``'s runtime unless its stamp says this spec is in place; returns its
    folder. ``notify`` hears one line before an install starts (it may take a while). Raises
    StackError naming ``servers.<name>.runtime`` and the log on failure."""
    environ = os.environ if environ is None else environ
    runtime = _runtime(server)
    where = f"servers.{server.name}.runtime"
    directory = runtime_dir(config, server, environ)
    want = spec_hash(runtime)
    log = log_file(config, server)
    log.parent.mkdir(parents=True, exist_ok=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in environ.items() if k not in _INSTALL_ENV_DROP}
    env["PATH"] = environ.get("PATH", os.defpath)
    with open(directory.parent / f"{directory.name}.lock", "a") as lock, open(log, "ab") as out:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another stack may be installing the same spec
        if _installed(directory, want):
            out.write(f"{runtime.kind} runtime {list(runtime.packages)} reused from "
                      f"{directory}\n".encode())
            return directory
        if notify is not None:
            notify(f"installing the {runtime.kind} runtime of servers.{server.name} "
                   f"({', '.join(runtime.packages)}) into {directory}; log: {log}")
        shutil.rmtree(directory, ignore_errors=True)  # a half-done or outdated install
        directory.mkdir(parents=True)
        started = time.monotonic()
        for argv in install_commands(runtime, directory):
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            try:
                code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, env=env, cwd=directory,
                                      timeout=INSTALL_TIMEOUT_SECONDS, check=False).returncode
            except FileNotFoundError:
                need = "npm (Node.js)" if runtime.kind == "npm" else argv[0]
                raise StackError(f"{where}: {need} is not installed or not on PATH, needed to "
                                 f"install {', '.join(runtime.packages)}") from None
            except subprocess.TimeoutExpired:
                raise StackError(f"{where}: installing {', '.join(runtime.packages)} took longer "
                                 f"than {INSTALL_TIMEOUT_SECONDS:g} s; see {log}") from None
            if code != 0:
                raise StackError(f"{where}: `{' '.join(argv[:4])} ...` failed (exit code {code}) "
                                 f"installing {', '.join(runtime.packages)}; see {log}")
        (directory / STAMP).write_text(want + "\n", encoding="utf-8")
        out.write(f"installed in {time.monotonic() - started:.1f} s into {directory}\n".encode())
    return directory


def resolve_command(server: ServerConfig, path_value: str, workdir: str) -> str | None:
    """The program ``server.command[0]`` names, as the bridge will start it: a bare name is
    looked up on ``path_value``; a path is taken relative to the workdir. None: not found."""
    program = server.command[0]
    if "/" not in program:
        return shutil.which(program, path=path_value)
    candidate = Path(workdir) / program  # an absolute program stays as it is
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return None


def check_command(server: ServerConfig, path_value: str, workdir: str) -> str:
    """``resolve_command`` or a StackError naming ``servers.<name>.command``."""
    found = resolve_command(server, path_value, workdir)
    if found is not None:
        return found
    program = server.command[0]
    if "/" in program:
        raise StackError(f"servers.{server.name}.command: {program!r} is not an executable file "
                         f"(relative paths are taken from the workdir {workdir})")
    where = "PATH, with the runtime's bin folders first" if server.runtime else "PATH"
    raise StackError(f"servers.{server.name}.command: {program!r} not found on {where}"
                     + ("" if server.runtime else "; add a runtime (pip or npm) that installs it, "
                        "or give its full path"))
