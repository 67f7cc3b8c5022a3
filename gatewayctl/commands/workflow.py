"""``mcp-gateway workflow validate FILE...``: check workflow files before deployment.

Each file is parsed and checked like the workflow server does at start (keys, input schema,
references, dependency cycles), then every step's and compensation's server against the gateway
config and, where the tool catalog has seen that server, the tool against its known tools.
A step output used in later arguments or a compensation without the step's ``output_schema`` is
a warning (a problem with ``--strict``): the server would use whatever value the server chose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.config import ConfigError, load_config
from mcp_servers.workflow.spec import (
    SELF_SERVER,
    SpecError,
    Workflow,
    check_targets,
    load_file,
    unchecked_output_refs,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    wf = sub.add_parser("workflow", help="workflow files of the workflow server (docs/workflows.md)")
    wsub = wf.add_subparsers(dest="workflow_command", required=True)
    val = wsub.add_parser("validate", help="check workflow files: keys, schemas, references, cycles, "
                                           "servers and tools")
    val.add_argument("files", nargs="+", type=Path, metavar="FILE|DIR",
                     help="workflow files, or folders whose *.yaml / *.yml files are checked (as the "
                          "workflow server loads a folder)")
    val.add_argument("--catalog", type=Path, default=None,
                     help="tool catalog to check tool names against (default: catalog.path of the "
                          "config, when that file exists; servers it has not seen are checked by name)")
    val.add_argument("--no-catalog", action="store_true", help="check servers only, not tools")
    val.add_argument("--strict", action="store_true",
                     help="a step output used without an output_schema is a problem, not a warning")
    wf.set_defaults(func=run)


def known_tools(path: Path | None, servers: list[str]) -> dict[str, frozenset[str] | None]:
    """Each server -> the tools the catalog lists for it (None: the catalog has not seen it)."""
    known: dict[str, frozenset[str] | None] = dict.fromkeys(servers)
    if path is None or not path.exists():
        return known
    from gateway.catalog.store import Catalog  # the catalog's imports only when it is read
    with Catalog(path) as catalog:
        for server in servers:
            names = frozenset(e.name for e in catalog.entries(server, kind="tool") if e.present)
            known[server] = names or None
    return known


def _expand(paths: list[Path], problems: list[str]) -> list[Path]:
    """Files as given; a folder stands for its *.yaml and *.yml files (not its sub-folders), in
    name order; an empty folder is a problem, not a silent success."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                problems.append(f"{path}: no workflow files (*.yaml, *.yml) in this folder")
            out.extend(found)
        else:
            out.append(path)
    return out


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mcp-gateway workflow: {exc}", file=sys.stderr)
        return 2
    servers = [s.name for s in config.servers if s.name != SELF_SERVER]
    catalog = None if args.no_catalog else (args.catalog or Path(config.catalog.path))
    tools = known_tools(catalog, servers)
    problems: list[str] = []
    names: dict[str, Path] = {}
    loaded: list[Workflow] = []
    for path in _expand(args.files, problems):
        try:
            wf = load_file(path)
        except SpecError as exc:
            problems.append(str(exc))
            continue
        if wf.name in names:
            problems.append(f"{path}: name: {wf.name!r} is also the name in {names[wf.name]}")
        names[wf.name] = path
        loaded.append(wf)
        problems.extend(check_targets(wf, tools))
        unchecked = unchecked_output_refs(wf)
        if args.strict:
            problems.extend(unchecked)
        else:
            for line in unchecked:
                print(f"warning: {line}", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    unchecked = sorted({c.server for wf in loaded for _, c in wf.calls()
                        if c.server in tools and tools[c.server] is None})
    if not problems:
        for wf in loaded:
            print(f"{wf.source}: ok ({wf.name}, {len(wf.steps)} steps)")
        if unchecked and not args.no_catalog:
            print(f"note: tool names not checked for {', '.join(unchecked)} (not in the catalog"
                  f"{' ' + str(catalog) if catalog else ''})")
    return 1 if problems else 0
