"""``mcp-gateway up|down|status|token|config``: the dev stack and the Envoy config."""

from __future__ import annotations

import argparse
import difflib
import json
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from gateway.config import ConfigError, GatewayConfig, load_config
from gatewayctl import assertion_keys, devstack, envoy_config, envoy_errors
from gatewayctl.devstack.credentials import ensure_inner_tls

# Exit codes: 0 ok, 1 failure, 2 usage (argparse), 3 the stack is not running.
NOT_RUNNING = 3


def _config(args: argparse.Namespace) -> GatewayConfig:
    return load_config(args.config)


def _fail(message: str) -> int:
    print(f"mcp-gateway: {message}", file=sys.stderr)
    return 1


def cmd_up(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(str(exc))
    stack = devstack.Stack(config, startup_timeout=args.timeout)
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if starting:
            raise KeyboardInterrupt  # abort start-up; Stack.start stops what already runs

    if not args.detach:
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    print(f"starting the dev stack (state in {config.state_dir}) ...", flush=True)
    try:
        stack.start(detach=args.detach)
        starting = False
        print(devstack.banner(config, devstack.dev_token(config), stack.ca_file, detach=args.detach,
                              components=stack.components), flush=True)
        if args.detach:
            print(f"PIDs: {devstack.paths(config).pid_file}")
            return 0
        stack.supervise(stop)
        return 0
    except KeyboardInterrupt:
        return 130 if starting else 0
    except (devstack.StackError, envoy_config.EnvoyConfigError) as exc:
        return _fail(str(exc))
    finally:
        if not args.detach:
            print("\nstopping ...", file=sys.stderr, flush=True)
            stack.stop()


def cmd_down(args: argparse.Namespace) -> int:
    try:
        stopped = devstack.down(_config(args))
    except (ConfigError, devstack.StackError) as exc:
        return _fail(str(exc))
    print(f"stopped {len(stopped)} process(es)" if stopped else "no dev stack is running")
    return 0


def cmd_config_diff(args: argparse.Namespace) -> int:
    """What would change in the running Envoy if the gateway config were applied now."""
    try:
        config = _config(args)
        running_file = devstack.paths(config).envoy_yaml
        live = devstack.running_envoy_digest(config)
        if live is None:
            return _fail(f"no Envoy answers on the admin interface {config.admin.host}:"
                         f"{config.admin.port}: start the stack (`mcp-gateway up`)")
        running = running_file.read_text(encoding="utf-8") if running_file.exists() else ""
        if envoy_config.config_digest(running) != live:
            return _fail(f"the running Envoy's config (digest {live[:12]}) is not {running_file}: "
                         "it was started from another rendering; `mcp-gateway reload` applies "
                         "the current one")
        with_ext_proc = "envoy.filters.http.ext_proc" in running
        fresh = _render(config, "on" if with_ext_proc else "off")
    except (ConfigError, devstack.StackError, envoy_config.EnvoyConfigError, OSError) as exc:
        return _fail(str(exc))
    strip = envoy_config.without_digest
    lines = list(difflib.unified_diff(strip(running).splitlines(), strip(fresh).splitlines(),
                                      "running", "rendered now", lineterm="", n=args.context))
    if not lines:
        print(f"the running Envoy runs the rendering of {config.source} (digest {live[:12]})")
        return 0
    print("\n".join(lines))
    print(f"\n`mcp-gateway reload` applies it ({sum(1 for x in lines if x[:1] in '+-') - 2} "
          "changed line(s))", file=sys.stderr)
    return 1


def cmd_reload(args: argparse.Namespace) -> int:
    try:
        result = devstack.reload(_config(args))
    except (ConfigError, devstack.StackError, envoy_config.EnvoyConfigError) as exc:
        return _fail(str(exc))
    print(f"Envoy reloaded without dropping requests: pid {result['pid']}, restart epoch "
          f"{result['restart_epoch']} (the previous Envoy drains and exits)")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        if args.component == "envoy":  # Envoy restarts by hot restart: no request dropped
            result = devstack.reload(config)
            print(f"envoy reloaded (restart epoch {result['restart_epoch']})")
            return 0
        entries = devstack.restart(config, args.component, args.instance)
    except (ConfigError, devstack.StackError, envoy_config.EnvoyConfigError) as exc:
        return _fail(str(exc))
    for e in entries:
        print(f"{e['component']}[{e['instance']}] restarted: pid {e['pid']}, healthy")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        rows = devstack.status(config)
    except (ConfigError, devstack.StackError) as exc:
        return _fail(str(exc))
    running = any(r["alive"] for r in rows)
    healthy = bool(rows) and all(r["healthy"] for r in rows)
    if args.json:
        print(json.dumps({"state_dir": config.state_dir, "running": running, "healthy": healthy,
                          "components": rows}, indent=2))
    elif not rows:
        print("no dev stack is running")
    else:
        print(f"{'COMPONENT':<14}{'INST':>5}  {'ADDRESS':<22}{'PID':>8}  {'HEALTH':<10}  ENVOY SEES")
        for r in rows:
            health = "healthy" if r["healthy"] else ("unhealthy" if r["alive"] else "stopped")
            pid = r["pid"] if r["pid"] is not None else "-"  # a url server runs elsewhere
            seen = r.get("envoy") or "-"  # what Envoy's health checks and outlier detection say
            print(f"{r['component']:<14}{r['instance']:>5}  {r['address']:<22}{pid:>8}  "
                  f"{health:<10}  {seen}")
    if not running:
        return NOT_RUNNING
    return 0 if healthy else 1


def cmd_token(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        key_file = devstack.paths(config).signing_key
        if not key_file.exists():
            # Minting with a key made on the spot would print a token no running stack accepts.
            return _fail(f"no dev signing key at {key_file}: start the stack first (`mcp-gateway up`, "
                         "run from the checkout) or pass the --config the stack was started with")
        token = devstack.mint(config, sub=args.sub, roles=tuple(args.role),
                              scopes=tuple(args.scope) if args.scope is not None else None,
                              tenant=args.tenant, ttl=args.ttl, server=args.server)
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyError as exc:
        return _fail(f"no server named {exc.args[0]!r} in the config")
    print(token)
    return 0


def _render(config: GatewayConfig, ext_proc: str = "auto", relative_to: str | None = None) -> str:
    with_ext_proc = envoy_config.ext_proc_available() if ext_proc == "auto" else ext_proc == "on"
    return envoy_config.render(config, envoy_config.RenderOptions(
        ext_proc=with_ext_proc, relative_to=Path(relative_to) if relative_to else None))


def _render_traced(config: GatewayConfig, ext_proc: str = "auto"
                   ) -> tuple[str, envoy_errors.Origins]:
    with_ext_proc = envoy_config.ext_proc_available() if ext_proc == "auto" else ext_proc == "on"
    return envoy_config.render_traced(config, envoy_config.RenderOptions(ext_proc=with_ext_proc))


def cmd_config_render(args: argparse.Namespace) -> int:
    try:
        text = _render(_config(args), args.ext_proc, args.relative_to)
    except (ConfigError, envoy_config.EnvoyConfigError) as exc:
        return _fail(str(exc))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    try:
        if args.file:
            try:
                output = envoy_config.validate(args.file)
            except envoy_config.EnvoyConfigError as exc:
                text = Path(args.file).read_text(encoding="utf-8", errors="replace")
                raise envoy_config.EnvoyConfigError(
                    f"Envoy refused {args.file}: {envoy_errors.explain(str(exc), text, None)}"
                ) from None
            print(output or f"{args.file}: OK")
            return 0
        config = _config(args)
        text, origins = _render_traced(config, args.ext_proc)
        traced = text  # the lines the origins are for (stand-ins below re-dump the YAML)
        if not args.no_files:
            # The dev certificates are created the way `up` does, so a fresh clone validates.
            devstack.ensure_tls(config)
            ensure_inner_tls(config)  # inner_tls: its certificates and Envoy's SDS files
            try:  # identity: the assertion key and the JWKS file Envoy publishes
                assertion_keys.ensure(config)
            except assertion_keys.KeysError as exc:
                print(f"mcp-gateway config validate: {exc}", file=sys.stderr)
                return 1
        scratch = Path(tempfile.mkdtemp(prefix="mcp-gateway-validate-"))
        if args.no_files:
            text, stood_in = envoy_config.stand_in_missing_files(text, scratch)
            for missing in stood_in:
                print(f"not on this machine, checked with a stand-in: {missing}")
        rendered = scratch / "envoy.yaml"
        rendered.write_text(text, encoding="utf-8")
        try:
            envoy_config.validate(rendered)
        except envoy_config.EnvoyConfigError as exc:
            # Traced back to the template line and gateway key; the rendered config is kept for
            # the operator to open (its line numbers are the ones named).
            raise envoy_config.EnvoyConfigError(
                f"Envoy refused the config rendered from {config.source}: "
                f"{envoy_errors.explain(str(exc), traced, origins)}\n"
                f"(the rendered config is kept at {rendered})") from None
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"Envoy config rendered from {config.source} is valid")
        return 0
    except (ConfigError, envoy_config.EnvoyConfigError, devstack.StackError) as exc:
        return _fail(str(exc))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = subparsers.add_parser("up", help="start the local dev stack (Ctrl-C stops it)")
    up.add_argument("--detach", action="store_true",
                    help="return once every component is healthy, leaving the stack running")
    up.add_argument("--timeout", type=float, default=devstack.STARTUP_TIMEOUT_SECONDS,
                    help="seconds to wait for every component to become healthy")
    up.set_defaults(func=cmd_up)

    down = subparsers.add_parser("down", help="stop a detached dev stack")
    down.set_defaults(func=cmd_down)

    rl = subparsers.add_parser("reload", help="apply Envoy config and certificate changes to the "
                               "running stack without dropping requests (Envoy hot restart)")
    rl.set_defaults(func=cmd_reload)

    rs = subparsers.add_parser("restart", help="stop and start again one component of the running "
                               "stack (all its instances one after the other, or one)")
    rs.add_argument("component", help="a component as `status` names it (files, ext_authz, ...)")
    rs.add_argument("instance", nargs="?", type=int, help="only this instance (default: all)")
    rs.set_defaults(func=cmd_restart)

    st = subparsers.add_parser("status", help="show each process of the dev stack")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    tok = subparsers.add_parser("token", help="print a token the dev stack accepts")
    tok.add_argument("--sub", default=devstack.DEV_TOKEN_SUB, help="subject (user id)")
    tok.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    tok.add_argument("--scope", action="append", default=None,
                     help="a scope (repeatable; default: tools:call:<server>/* for each server)")
    tok.add_argument("--tenant", help="tenant claim")
    tok.add_argument("--ttl", type=int, default=3600,
                     help="lifetime in seconds; negative mints an already-expired token")
    tok.add_argument("--server", help="audience: only this server (default: every server)")
    tok.set_defaults(func=cmd_token)

    cfg = subparsers.add_parser("config", help="render or validate the Envoy config")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    render = cfg_sub.add_parser("render", help="print the Envoy config rendered from the gateway config")
    render.add_argument("-o", "--output", help="write to this file instead of stdout")
    render.add_argument("--ext-proc", choices=("auto", "on", "off"), default="auto",
                        help="render the ext_proc filter and cluster (auto: when ext_proc is installed)")
    render.add_argument("--relative-to", metavar="DIR",
                        help="write file paths under DIR relative to it (for checked-in examples)")
    render.set_defaults(func=cmd_config_render)
    validate = cfg_sub.add_parser("validate", help="run `envoy --mode validate` on the Envoy config")
    validate.add_argument("file", nargs="?",
                          help="an Envoy YAML file (default: render the gateway config and check it)")
    validate.add_argument("--no-files", action="store_true",
                          help="check with throwaway stand-ins for certificate and key files that "
                               "are not on this machine (CI checks of production configs)")
    validate.add_argument("--ext-proc", choices=("auto", "on", "off"), default="auto",
                          help="render the ext_proc filter and cluster (auto: when ext_proc is installed)")
    validate.set_defaults(func=cmd_config_validate)
    diff = cfg_sub.add_parser("diff", help="what applying the gateway config would change in the "
                              "running Envoy (exit 1: a difference)")
    diff.add_argument("-U", "--context", type=int, default=3, help="lines of context")
    diff.set_defaults(func=cmd_config_diff)
