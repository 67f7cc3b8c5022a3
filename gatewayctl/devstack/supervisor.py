"""The supervisor: start the planned processes wave by wave, wait until each is healthy, keep
them running in the foreground or leave them detached, and stop them; ``status`` and ``down``
act on a stack another process started.

Process handling, and why:
* Every child gets its own session (``start_new_session=True``): a Ctrl-C in the terminal
  reaches only the supervisor, which stops children in reverse order; and detached children
  survive the shell that started them (seen here: an Envoy started from a short-lived shell
  died with that shell's job).
* In the foreground the children also ask the kernel for SIGTERM when the supervisor dies
  (``PR_SET_PDEATHSIG``), so not even a SIGKILLed supervisor leaves orphans.
* A PID file in ``state_dir`` records each PID with its kernel start time; ``down`` and
  ``status`` act only on processes whose start time still matches, so a reused PID is never
  signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.telemetry.audit_retention import prune_logs, rotate_logs
from gatewayctl import assertion_keys, envoy_config, envoy_restarter, runtimes
from gatewayctl.devstack.credentials import (
    ensure_audit_key,
    ensure_inner_tls,
    ensure_secrets,
    ensure_tls,
    signing_key,
)
from gatewayctl.devstack.health import (
    PROBE_TIMEOUT_SECONDS,
    cluster_of,
    envoy_view,
    probe,
    upstream_problem,
)
from gatewayctl.devstack.plan import (
    Component,
    Probe,
    base_dir,
    check_ports,
    listening_ports,
    plan,
    remote,
    workdir,
)
from gatewayctl.devstack.state import StackError, paths

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.1


# ---------------------------------------------------------------------------- PID bookkeeping

def _start_time(pid: int) -> int | None:
    """Kernel start time of a live, non-zombie process (None if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(entry: dict[str, Any]) -> bool:
    started = _start_time(int(entry["pid"]))
    return started is not None and started == entry.get("start_time")


def read_pid_file(config: GatewayConfig) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(paths(config).pid_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read {paths(config).pid_file}: {exc}") from None
    return data


# -------------------------------------------------------------------------------------- stack

_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    return hook


def _tell(line: str) -> None:
    """A line under `up`'s "starting the dev stack ..." (an install may take a while)."""
    print(f"  {line}", flush=True)


def _stack_env(config: GatewayConfig) -> dict[str, str]:
    """The environment every process of the stack starts from."""
    # A secret reaches only the processes that list it, whatever the parent environment holds.
    env = {k: v for k, v in os.environ.items() if k not in config.secrets}
    env["PYTHONUNBUFFERED"] = "1"
    if config.telemetry.otlp_endpoint:
        # MCP servers take their collector from the standard OpenTelemetry variable (a server
        # module need not accept a flag for it); ext_authz and ext_proc read the config.
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = config.telemetry.otlp_endpoint
    return env


def _component_env(base: dict[str, str], comp: Component, secrets: dict[str, str]
                   ) -> dict[str, str]:
    """A component's environment: the stack's, the secrets it lists, and its PATH prefix."""
    # An upstream credential nobody set is absent (never generated): its server answers 503.
    env = {**base, **{n: secrets[n] for n in comp.env if n in secrets}, **dict(comp.tls_env)}
    if comp.path_prefix:
        env["PATH"] = os.pathsep.join([*comp.path_prefix, base.get("PATH", os.defpath)])
    return env


@dataclass
class Stack:
    """A running (or starting) dev stack."""

    config: GatewayConfig
    ext_proc: bool | None = None
    modules: dict[str, str] | None = None
    startup_timeout: float = STARTUP_TIMEOUT_SECONDS
    components: list[Component] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ca_file: Path | None = None
    secrets: dict[str, str] = field(default_factory=dict)

    def prepare(self) -> None:
        """Certificates, keys, effective config and Envoy config; fails before starting anything."""
        p = paths(self.config)
        running = read_pid_file(self.config)
        if running and any(_alive(e) for e in running.get("components", [])):
            raise StackError(f"a dev stack is already running from {p.state_dir}; "
                             f"run `mcp-gateway down` first")
        self.components = plan(self.config, ext_proc=self.ext_proc, modules=self.modules)
        for server in self.config.servers:
            if server.kind == "command":
                # The stdio server's working directory (the bridge runs the command there).
                workdir(self.config, server).mkdir(parents=True, exist_ok=True)
        check_ports(listening_ports(self.config, self.components))
        p.logs.mkdir(parents=True, exist_ok=True)
        if self.config.audit.log_retention_days is not None:
            # Each run's logs in their own files, so retention can drop whole earlier runs.
            rotate_logs(p.logs)
            prune_logs(p.logs, self.config.audit.log_retention_days)
        self.prepare_commands()
        self.ca_file = ensure_tls(self.config)
        ensure_inner_tls(self.config)
        ensure_audit_key(self.config)
        self.secrets = ensure_secrets(self.config)
        signing_key(self.config)
        try:  # the caller assertion's keys (made on first up; Envoy publishes the JWKS file)
            assertion_keys.ensure(self.config)
        except assertion_keys.KeysError as exc:
            raise StackError(str(exc)) from None
        with_ext_proc = any(c.name == "ext_proc" for c in self.components)
        p.envoy_yaml.write_text(envoy_config.render(
            self.config, envoy_config.RenderOptions(ext_proc=with_ext_proc)), encoding="utf-8")

    def prepare_commands(self) -> None:
        """Install the runtime of every command server (reused when unchanged), then check that
        each command names a program the bridge will find: on PATH with the runtime's bin
        folders first, or a file relative to the workdir."""
        for server in self.config.servers:
            if server.kind != "command":
                continue
            if server.runtime is not None:
                runtimes.ensure(self.config, server, notify=_tell)
            runtimes.check_command(server, runtimes.search_path(self.config, server),
                                   str(workdir(self.config, server)))

    def start(self, *, detach: bool) -> None:
        """Start every component and wait until all are healthy (or raise, leaving none)."""
        self.prepare()
        hook = None if detach else _die_with_parent_hook()
        cwd = base_dir(self.config)
        env = _stack_env(self.config)
        # Backends first (servers may read from them at start-up); then the Python processes in
        # parallel; Envoy once they answer, so its first round of active health checks finds
        # them up instead of marking them failed.
        waves = [[c for c in self.components if c.wave == w] for w in (0, 1, 2)]
        try:
            for wave in waves:
                for comp in wave:
                    if remote(comp):
                        continue  # a url server: checked, never started
                    self._spawn(comp, hook, cwd, _component_env(env, comp, self.secrets))
                    self._write_pid_file(supervisor=None if detach else os.getpid())
                self.wait_healthy(wave)
            self._write_pid_file(supervisor=None if detach else os.getpid(), ready=True)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, comp: Component, hook: Callable[[], None] | None, cwd: Path,
               env: dict[str, str]) -> None:
        log = paths(self.config).logs / f"{comp.name}-{comp.instance}.log"
        with open(log, "ab") as out:
            # argv is built from the config and never passes through a shell.
            self.procs[comp.label] = subprocess.Popen(
                comp.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, start_new_session=True, preexec_fn=hook)
        logger.debug("started %s pid %d", comp.label, self.procs[comp.label].pid)

    def _write_pid_file(self, *, supervisor: int | None, ready: bool = False) -> None:
        entries = []
        for comp in self.components:
            proc = self.procs.get(comp.label)
            if proc is None:
                continue
            entries.append({"component": comp.name, "instance": comp.instance,
                            "address": comp.address, "pid": proc.pid,
                            "start_time": _start_time(proc.pid),
                            "log": str(paths(self.config).logs / f"{comp.name}-{comp.instance}.log"),
                            "probe": asdict(comp.probe),
                            # What `restart` starts again: the same process, not a re-plan.
                            "argv": list(comp.argv), "env": list(comp.env),
                            "path_prefix": list(comp.path_prefix),
                            "tls_env": dict(comp.tls_env)})
        # `ready`: every component answered its health check once (start-up is over).
        data: dict[str, Any] = {"config": self.config.source, "ready": ready, "components": entries}
        if supervisor is not None:
            data["supervisor"] = {"pid": supervisor, "start_time": _start_time(supervisor)}
        path = paths(self.config).pid_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)

    def wait_healthy(self, components: list[Component] | None = None) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for comp in self.components if components is None else components:
            if remote(comp):
                self._wait_upstream(comp, deadline)
                continue
            proc = self.procs[comp.label]
            while not probe(comp, self.config, self.ca_file):
                if proc.poll() is not None:
                    raise StackError(f"{comp.label} exited with code {proc.returncode} during "
                                     f"start-up:\n{self.log_tail(comp)}")
                if time.monotonic() > deadline:
                    raise StackError(f"{comp.label} on {comp.address} was not healthy within "
                                     f"{self.startup_timeout:g} s:\n{self.log_tail(comp)}")
                time.sleep(POLL_INTERVAL_SECONDS)

    def _wait_upstream(self, comp: Component, deadline: float) -> None:
        while (problem := upstream_problem(comp, self.config)) is not None:
            if time.monotonic() > deadline:
                server = self.config.server(comp.name)
                raise StackError(f"servers.{comp.name} ({comp.probe.path}) was not healthy within "
                                 f"{self.startup_timeout:g} s ({server.health} check): {problem}")
            time.sleep(POLL_INTERVAL_SECONDS)

    def log_tail(self, comp: Component, lines: int = 20) -> str:
        log = paths(self.config).logs / f"{comp.name}-{comp.instance}.log"
        try:
            text = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {log})"
        return "\n".join(f"  | {line}" for line in text) + f"\n  (full log: {log})"

    def _replaced(self, label: str, pid: int) -> bool:
        """Whether the PID file now names another live process for ``label`` (a restart)."""
        with contextlib.suppress(StackError):
            for entry in (read_pid_file(self.config) or {}).get("components", []):
                if f"{entry['component']}[{entry['instance']}]" == label and entry["pid"] != pid:
                    return _alive(entry)
        return False

    def stop(self) -> None:
        """Stop every started child, newest first; SIGKILL what ignores SIGTERM (idempotent)."""
        # A process `restart` started is not this process's child: stop it by its PID file entry.
        with contextlib.suppress(StackError):
            mine = {proc.pid for proc in self.procs.values()}
            for entry in (read_pid_file(self.config) or {}).get("components", []):
                if entry["pid"] not in mine and _alive(entry):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(entry["pid"], signal.SIGTERM)
        for comp in reversed(self.components):
            proc = self.procs.get(comp.label)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        with contextlib.suppress(FileNotFoundError):
            paths(self.config).pid_file.unlink()

    def supervise(self, stop: threading.Event) -> None:
        """Foreground: report children that exit; return when ``stop`` is set or none is left."""
        reported: set[str] = set()
        while not stop.wait(0.5):
            for label, proc in self.procs.items():
                if label not in reported and proc.poll() is not None:
                    reported.add(label)
                    if self._replaced(label, proc.pid):
                        print(f"{label} was restarted (`mcp-gateway restart`)", flush=True)
                        continue
                    comp = next(c for c in self.components if c.label == label)
                    print(f"!! {label} exited with code {proc.returncode}\n{self.log_tail(comp, 5)}",
                          file=sys.stderr, flush=True)
            if len(reported) == len(self.procs):
                return


@contextlib.contextmanager
def running(config: GatewayConfig, **kwargs: Any) -> Iterator[Stack]:
    """A started stack for the duration of a ``with`` block (children die with this process)."""
    stack = Stack(config, **kwargs)
    stack.start(detach=False)
    try:
        yield stack
    finally:
        stack.stop()


# ------------------------------------------------------------------------------ status / down

def status(config: GatewayConfig) -> list[dict[str, Any]]:
    """One row per recorded process: component, instance, address, pid, alive, healthy."""
    data = read_pid_file(config)
    if data is None:
        return []
    ca = paths(config).ca_cert
    view = envoy_view(config)
    rows = []
    for entry in data.get("components", []):
        alive = _alive(entry)
        pr = Probe(**entry["probe"])
        host, _, port = entry["address"].rpartition(":")
        comp = Component(entry["component"], entry["instance"], host, int(port), (), pr)
        rows.append({"component": entry["component"], "instance": entry["instance"],
                     "address": entry["address"], "pid": entry["pid"], "alive": alive,
                     "healthy": alive and probe(comp, config, ca if ca.exists() else None),
                     "log": entry.get("log"),
                     "envoy": _seen_by_envoy(view, entry["component"], entry["address"], config)})
    # url servers run elsewhere: no process, their URL as address and their MCP-level check.
    for server in config.servers:
        for i, url in enumerate(server.urls):
            comp = Component(server.name, i, url.host, url.port, (),
                             Probe("mcp", url.host, url.port, url.url, server.name))
            rows.append({"component": server.name, "instance": i, "address": url.url,
                         "pid": None, "alive": True, "healthy": probe(comp, config, None),
                         "log": None,
                         "envoy": _seen_by_envoy(view, server.name, f"{url.host}:{url.port}",
                                                 config)})
    return rows


def restart(config: GatewayConfig, component: str, instance: int | None = None, *,
            timeout: float = STARTUP_TIMEOUT_SECONDS) -> list[dict[str, Any]]:
    """Stop and start again the processes of one component of a running stack (one instance,
    or all of them one after the other, so the others keep serving), exactly as they were
    started, and wait until each is healthy. Returns their PID file entries. Envoy is
    restarted by ``reload`` (hot restart), not here."""
    p = paths(config)
    data = read_pid_file(config)
    entries = (data or {}).get("components", [])
    chosen = [e for e in entries if e["component"] == component
              and (instance is None or e["instance"] == instance)]
    if data is None or not chosen:
        names = sorted({f"{e['component']}[{e['instance']}]" for e in entries})
        raise StackError(f"no {component}{'' if instance is None else f'[{instance}]'} in the "
                         f"running stack ({', '.join(names) or 'none is running'})")
    if any("argv" not in e for e in chosen):
        raise StackError("this stack was started by an older mcp-gateway: `down` and `up` it")
    secrets = ensure_secrets(config)
    base = _stack_env(config)
    ca = p.ca_cert if p.ca_cert.exists() else None
    for entry in chosen:
        label = f"{entry['component']}[{entry['instance']}]"
        if _alive(entry):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(entry["pid"], signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while _alive(entry) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_SECONDS)
            if _alive(entry):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(entry["pid"], signal.SIGKILL)
        host, _, port = entry["address"].rpartition(":")
        comp = Component(entry["component"], entry["instance"], host, int(port),
                         tuple(entry["argv"]), Probe(**entry["probe"]), env=tuple(entry["env"]),
                         path_prefix=tuple(entry.get("path_prefix", ())),
                         tls_env=tuple(entry.get("tls_env", {}).items()))
        with open(entry["log"], "ab") as out:
            proc = subprocess.Popen(comp.argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=base_dir(config),
                                    env=_component_env(base, comp, secrets), start_new_session=True)
        entry.update(pid=proc.pid, start_time=_start_time(proc.pid))
        tmp = p.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(p.pid_file)
        deadline = time.monotonic() + timeout
        while not probe(comp, config, ca):
            if proc.poll() is not None:
                raise StackError(f"{label} exited with code {proc.returncode} after the restart "
                                 f"(log: {entry['log']})")
            if time.monotonic() > deadline:
                raise StackError(f"{label} was not healthy within {timeout:g} s after the restart "
                                 f"(log: {entry['log']})")
            time.sleep(POLL_INTERVAL_SECONDS)
    return chosen


def _seen_by_envoy(view: dict[tuple[str, str], str] | None, component: str, address: str,
                   config: GatewayConfig) -> str | None:
    """Envoy's word on one instance ("healthy", "ejected (outlier)", ...); None where Envoy
    routes nothing to it (Envoy itself, the JWKS server, backends) or does not answer."""
    cluster = cluster_of(component, config)
    if view is None or cluster is None:
        return None
    return view.get((cluster, address), "not a member of its cluster")


def down(config: GatewayConfig, timeout: float = STOP_TIMEOUT_SECONDS) -> list[int]:
    """Stop exactly the processes in the PID file; returns the PIDs that were signalled."""
    data = read_pid_file(config)
    if data is None:
        return []
    # (entry, signal the whole process group): children lead their own group, which also holds
    # anything they spawned; the foreground supervisor (if any) stops its children itself.
    entries: list[tuple[dict[str, Any], bool]] = [
        (e, True) for e in reversed(data.get("components", []))]
    supervisor = data.get("supervisor")
    if isinstance(supervisor, dict):
        entries.insert(0, (supervisor, False))
    live = [e for e in entries if _alive(e[0])]
    for entry, group in live:
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if group else os.kill)(entry["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(e) for e, _ in live) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_SECONDS)
    for entry, _ in live:
        if _alive(entry):
            logger.warning("pid %d ignored SIGTERM; sending SIGKILL", entry["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry["pid"], signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_alive(e) for e, _ in live) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_SECONDS)
    still = [e["pid"] for e, _ in live if _alive(e)]
    if still:
        raise StackError(f"processes {still} did not stop")
    with contextlib.suppress(FileNotFoundError):
        paths(config).pid_file.unlink()
    return [e["pid"] for e, _ in live]


# ---------------------------------------------------------------------------------- reload

def reload(config: GatewayConfig, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> dict[str, Any]:
    """Apply the gateway config's Envoy side and the current certificates to a running stack
    without dropping requests: render and validate the new Envoy config (a refused one changes
    nothing), then have the stack's Envoy restarter (gatewayctl.envoy_restarter) hot-restart
    Envoy. The new Envoy takes the listening sockets over; the old one finishes its requests,
    drains and exits. Returns the new restart epoch.

    Processes themselves (servers, ext_authz, ext_proc, their ports) are not changed by a reload:
    those changes need ``down`` and ``up``."""
    p = paths(config)
    data = read_pid_file(config)
    entries = (data or {}).get("components", [])
    envoy = next((e for e in entries if e["component"] == "envoy" and _alive(e)), None)
    admin = config.admin
    current = _serving_epoch(admin.host, admin.port)
    if data is None or not data.get("ready") or envoy is None or current is None:
        raise StackError(f"no running dev stack with a live Envoy in {p.state_dir}: "
                         f"start one with `mcp-gateway up`")
    with_ext_proc = any(e["component"] == "ext_proc" for e in entries)
    ensure_tls(config)  # certificates the stack makes itself are made again when removed
    ensure_inner_tls(config)
    candidate = p.envoy_yaml.with_name("envoy.next.yaml")
    candidate.write_text(envoy_config.render(
        config, envoy_config.RenderOptions(ext_proc=with_ext_proc)), encoding="utf-8")
    try:
        envoy_config.validate(candidate, cwd=base_dir(config))
    except envoy_config.EnvoyConfigError as exc:
        raise StackError(f"the new Envoy config was refused; the running Envoy keeps serving the "
                         f"old one:\n{exc}") from None
    candidate.replace(p.envoy_yaml)
    os.kill(int(envoy["pid"]), signal.SIGHUP)  # the restarter starts the next epoch
    deadline = time.monotonic() + timeout
    while _serving_epoch(admin.host, admin.port) != current + 1:
        failed = envoy_restarter.failed_epoch(p.state_dir)
        if failed == current + 1 or time.monotonic() > deadline:
            log = Path(envoy.get("log") or p.logs / "envoy-0.log")
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
            raise StackError(f"the new Envoy (restart epoch {current + 1}) did not take over; "
                             f"the old one keeps serving:\n{tail}")
        time.sleep(POLL_INTERVAL_SECONDS)
    return {"restart_epoch": current + 1, "pid": envoy["pid"]}


def running_envoy_digest(config: GatewayConfig) -> str | None:
    """The digest of the rendering the running Envoy was started from (its node metadata,
    admin /server_info); None when no Envoy answers or it carries none."""
    info = _server_info(config.admin.host, config.admin.port)
    if info is None:
        return None
    metadata = info.get("node", {}).get("metadata", {})
    digest = metadata.get("config_sha256") if isinstance(metadata, dict) else None
    return digest if isinstance(digest, str) else None


def _server_info(host: str, port: int) -> dict[str, Any] | None:
    conn = http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT_SECONDS)
    try:
        conn.request("GET", "/server_info")
        reply = conn.getresponse()
        if reply.status != 200:
            return None
        info = json.loads(reply.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return info if isinstance(info, dict) else None


def _serving_epoch(host: str, port: int) -> int | None:
    """The restart epoch of the LIVE Envoy answering on the admin port (None: none answers)."""
    info = _server_info(host, port)
    if info is None or info.get("state") != "LIVE":
        return None
    return int(info.get("command_line_options", {}).get("restart_epoch", 0))
