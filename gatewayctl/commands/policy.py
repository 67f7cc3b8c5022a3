"""``mcp-gateway policy test|eval``: run the Rego unit tests and check what the policy decides;
decide and explain one request."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load_config
from gateway.errors import GatewayError
from gateway.policy.decision import ContractViolation, check_decision
from gateway.policy.errors import PolicyError
from gateway.policy.reference import ReferenceEngine
from gateway.policy.rego import CompiledPolicy, PolicySources, load_sources
from gateway.policy.static import describe, is_warning, run_check
from gateway.policy.testing import (
    TestResult,
    check_samples,
    describe_error,
    discover_and_run,
    explain_decision,
    run_tests_opa,
)
from gatewayctl.commands import policy_check


def register(subparsers: Any) -> None:
    policy = subparsers.add_parser("policy", help="test and explain Rego policies")
    sub = policy.add_subparsers(dest="policy_command", required=True)
    policy_check.add_parser(sub)

    test = sub.add_parser("test", help="run every test_* rule of the policy folder")
    test.add_argument("--dir", help="policy folder (default: policy.dir of the config)")
    test.add_argument("-v", "--verbose", action="store_true", help="list every test, not only failures")
    test.add_argument("--run", metavar="REGEX",
                      help="only the tests whose name data.<package>.<rule> matches REGEX")
    test.add_argument("--engine", choices=ENGINES, default="opa",
                      help="run the tests on OPA in-process (default: fast, a trace of each "
                           "failure), on rego-cpp as the gateway serves them (embedded: tens of "
                           "seconds and several GB for the shipped suite), or on both, reporting "
                           "every test whose "
                           "outcome differs")
    test.set_defaults(func=cmd_test)

    ev = sub.add_parser("eval", help="decide one request as the gateway would, and explain it")
    ev.add_argument("--claims", help="token claims: JSON or @file (required unless --input)")
    ev.add_argument("--input", help="a whole policy input document, JSON or @file, evaluated as "
                    "is instead of one built from --claims/--request (e.g. from a Rego test)")
    ev.add_argument("--now", type=int, metavar="UNIX_SECONDS",
                    help="the time the input carries as input.now (default: the current time)")
    ev.add_argument("--request", help="JSON-RPC request body: JSON or @file (required for POST; "
                    "a GET or DELETE carries none)")
    ev.add_argument("--method", default="POST", choices=("POST", "GET", "DELETE"),
                    help="HTTP method: POST (a JSON-RPC message), GET (the session's stream), "
                         "DELETE (its end); default POST")
    ev.add_argument("--session", help="owner of the request's session as ext_authz binds it: JSON "
                    '{"iss", "sub", "tenant"} or @file (send its id with --header mcp-session-id:ID)')
    ev.add_argument("--server", default="files", help="target MCP server (default: files)")
    ev.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                    help="an HTTP request header (repeatable)")
    ev.add_argument("--dir", help="policy folder (default: policy.dir of the config)")
    ev.add_argument("--engine", choices=("embedded", "opa"), default="embedded",
                    help="the engine whose decision is printed: embedded (rego-cpp, what the "
                         "gateway decides; default) or opa (a remote-OPA deployment)")
    ev.add_argument("--explain", action="store_true",
                    help="trace the rules of the entrypoint's package that decided this request "
                         "(computed with OPA; says so when OPA decides differently)")
    ev.set_defaults(func=cmd_eval)


ENGINES = ("opa", "embedded", "both")
MAX_CONTRACT_LINES = 20
MAX_PARITY_LINES = 20
MAX_EXPLANATION_LINES = 12  # of one failing test


def _policy_settings(args: argparse.Namespace) -> tuple[str, str, str]:
    """(policy dir, entrypoint, public url) from the flags and the config."""
    cfg = load_config(args.config)
    return args.dir or cfg.policy.dir, cfg.policy.entrypoint, cfg.public_url


def cmd_test(args: argparse.Namespace) -> int:
    try:
        policy_dir, entrypoint, _ = _policy_settings(args)
        selected = re.compile(args.run) if args.run else None
    except re.error as exc:
        print(f"ERROR: --run {args.run!r} is not a regular expression: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    engine = getattr(args, "engine", "opa")
    start = time.perf_counter()
    static_errors = 0
    try:
        # (1) what is wrong without running anything
        for finding in run_check(policy_dir, entrypoint):
            where = f"{finding.file}:{finding.line}: " if finding.file else ""
            text = f"{where}{finding.message} ({finding.kind})"
            if is_warning(finding):
                print(f"WARN  {text}")
            else:
                static_errors += 1
                print(f"STATIC {text}")
        # (2) the tests, on the engine(s) asked for
        opa_results: list[TestResult] = []
        embedded_results: list[TestResult] = []
        notes: list[str] = []
        if engine in ("opa", "both"):
            opa_results, notes = run_tests_opa(policy_dir, run=selected, entrypoint=entrypoint)
        if engine in ("embedded", "both"):
            embedded_results = discover_and_run(policy_dir, run=selected)
        # (3) sample requests: the contract and the two engines' agreement (skipped with --run)
        report = None if selected else check_samples(policy_dir, entrypoint)
    except PolicyError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    results = embedded_results if engine == "embedded" else opa_results
    if not results:
        print(f"no test_* rules{' matching ' + repr(args.run) if args.run else ''} found in "
              f"{policy_dir}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"NOTE  {note}")
    for r in results:
        if args.verbose or not r.passed:
            line = f"{r.status:5} {r.file}:{r.line}: data.{r.package}.{r.name}"
            if r.detail:
                line += f" ({r.detail})"
            if args.verbose and r.duration_us:
                line += f" [{r.duration_us / 1000:.1f} ms]"
            print(line)
            shown = r.explanation[:MAX_EXPLANATION_LINES]
            for text in shown:
                print(f"      {text}")
            if len(r.explanation) > len(shown):
                print(f"      ... and {len(r.explanation) - len(shown)} more lines")
    differ = _outcome_differences(opa_results, embedded_results) if engine == "both" else []
    for text in differ:
        print(text)
    broken = report.contract if report else []
    for c in broken[:MAX_CONTRACT_LINES]:
        print(f"CONTRACT {entrypoint} for {c.request}: {c.problem}")
    if len(broken) > MAX_CONTRACT_LINES:
        print(f"CONTRACT ... and {len(broken) - MAX_CONTRACT_LINES} more sample requests")
    parity = report.parity if report else []
    for d in parity[:MAX_PARITY_LINES]:
        print(f"PARITY {entrypoint} for {d.request}: rego-cpp {d.embedded}, OPA {d.opa}")
    if len(parity) > MAX_PARITY_LINES:
        print(f"PARITY ... and {len(parity) - MAX_PARITY_LINES} more sample requests")
    failed = sum(not r.passed for r in results)
    if engine == "both":
        failed = max(failed, sum(not r.passed for r in embedded_results))
    print("-" * 60)
    print(f"PASS: {len(results) - failed}/{len(results)}" + (f"  FAIL: {failed}" if failed else "")
          + (f"  STATIC: {static_errors} error(s)" if static_errors else "")
          + (f"  CONTRACT: {len(broken)} sample decision(s) outside the decision contract"
             if broken else "")
          + (f"  PARITY: {len(parity)} sample request(s) decided differently by rego-cpp and OPA"
             if parity else "")
          + (f"  ENGINES: {len(differ)} test(s) with a different outcome" if differ else "")
          + f"  [{engine}, {time.perf_counter() - start:.2f} s]")
    return 1 if failed or broken or parity or differ or static_errors else 0


def _outcome_differences(opa: list[TestResult], embedded: list[TestResult]) -> list[str]:
    by_name = {(r.package, r.name): r for r in embedded}
    lines = []
    for r in opa:
        other = by_name.get((r.package, r.name))
        if other is not None and other.status != r.status:
            lines.append(f"ENGINES {r.file}:{r.line}: data.{r.package}.{r.name}: OPA {r.status}"
                         f"{' (' + r.detail + ')' if r.detail else ''}, rego-cpp {other.status}"
                         f"{' (' + other.detail + ')' if other.detail else ''}")
    return lines


def _json_arg(value: str, what: str) -> Any:
    text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--{what} is not valid JSON: {exc}") from None


def eval_input(args: argparse.Namespace, public_url: str) -> dict[str, Any]:
    """The policy input ext_authz would build for the request the arguments describe (the same
    builder, ``gateway.policy.input.build_policy_input``). Raises ValueError / OSError for bad
    arguments and GatewayError where ext_authz would refuse before the policy."""
    if args.input is not None:
        if args.claims or args.request or args.session or args.header or args.now is not None:
            raise ValueError("--input is the whole input: drop --claims, --request, --session, "
                             "--header and --now")
        document = _json_arg(args.input, "input")
        if not isinstance(document, dict):
            raise ValueError("--input must be a JSON object")
        return document
    if args.claims is None:
        raise ValueError("--claims is required (or give a whole --input)")
    claims = _json_arg(args.claims, "claims")
    if not isinstance(claims, dict):
        raise ValueError("--claims must be a JSON object")
    session = _json_arg(args.session, "session") if args.session else None
    if session is not None and not isinstance(session, dict):
        raise ValueError("--session must be a JSON object")
    headers: dict[str, str] = {}
    for item in args.header:
        # A pseudo-header (":authority:host") keeps its leading colon in the name.
        lead = ":" if item.startswith(":") else ""
        name, sep, value = item[len(lead):].partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header {item!r}: expected NAME:VALUE")
        headers[lead + name.strip().lower()] = value.strip()
    request = None
    if args.request is not None:
        req = args.request
        request = Path(req[1:]).read_bytes() if req.startswith("@") else req.encode()
    elif args.method == "POST":
        raise ValueError("--request is required for a POST")
    if request is not None and args.method != "POST":
        raise ValueError(f"a {args.method} request carries no JSON-RPC message: drop --request")
    # The console's playground builds its input with the same function. Imported here: it pulls
    # in the request parsers and the input builder's SQL facts (sqlglot), which `policy test`
    # does not use.
    from gateway.policy.simulate import simulated_input

    return simulated_input(claims=claims, request=request, public_url=public_url, server=args.server,
                           method=args.method, headers=headers, session=session, now=args.now)


# `policy eval` exit codes, so a script or CI job can assert a decision.
EXIT_ALLOW, EXIT_DENY, EXIT_ERROR = 0, 1, 2


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        policy_dir, entrypoint, public_url = _policy_settings(args)
        policy_input = eval_input(args, public_url)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except GatewayError as exc:  # e.g. an argument over a bound, as ext_authz refuses it
        return _refused_before_policy(exc)
    engine = getattr(args, "engine", "embedded")
    # The gateway refuses to load a folder that fails the static check: a decision from it
    # would describe a policy that never serves.
    refused = [f for f in run_check(policy_dir, entrypoint) if not is_warning(f)]
    if refused:
        print("ERROR: the policy fails `mcp-gateway policy check`; the gateway would refuse to "
              "load it:", file=sys.stderr)
        for finding in refused[:MAX_CONTRACT_LINES]:
            print(f"  {describe(finding)}", file=sys.stderr)
        return EXIT_ERROR
    try:
        sources = load_sources(policy_dir, include_tests=False)
    except PolicyError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_ERROR
    embedded: tuple[bool, Any] | PolicyError | None = None
    if engine == "embedded":
        try:
            embedded = CompiledPolicy(sources, [entrypoint]).evaluate(entrypoint, policy_input)
        except PolicyError as exc:
            embedded = exc
    opa: tuple[bool, Any] | PolicyError | None = None
    events: list[dict[str, Any]] = []
    if engine == "opa" or args.explain or isinstance(embedded, PolicyError):
        # OPA names the rule and line of a runtime error where rego-cpp names neither.
        opa, events = _opa_decide(sources, entrypoint, policy_input, trace=args.explain)
    primary = embedded if engine == "embedded" else opa
    engine_name = "rego-cpp" if engine == "embedded" else "OPA"
    if isinstance(primary, PolicyError) or primary is None:
        print(f"ERROR: {primary}", file=sys.stderr)
        if engine == "embedded" and isinstance(opa, PolicyError):
            for text in describe_error(str(opa), sources):
                print(f"  {text}", file=sys.stderr)
        elif engine == "embedded" and opa is not None:
            print(f"  OPA decides this input without an error: {_decision_text(opa)}",
                  file=sys.stderr)
        elif isinstance(primary, PolicyError):
            for text in describe_error(str(primary), sources):
                print(f"  {text}", file=sys.stderr)
        return EXIT_ERROR
    defined, value = primary
    try:
        decision = check_decision(value, defined=defined)
        verdict = "ALLOW" if decision.allow else "DENY"
        print(f"{verdict}  reason={decision.reason}  http_status={decision.http_status}"
              + (f"  missing_scope={decision.missing_scope}" if decision.missing_scope else ""))
        rc = EXIT_ALLOW if decision.allow else EXIT_DENY
    except ContractViolation as exc:
        # What ext_authz would answer 500 for: an error of the policy, not a decision.
        print(f"DENY  reason=policy_contract_error ({exc})")
        rc = EXIT_ERROR
    print(json.dumps({"decision": value if defined else "<undefined>"}, indent=2, sort_keys=True))
    if args.explain:
        package = entrypoint.rsplit("/", 1)[0].replace("/", ".")
        if isinstance(opa, PolicyError):
            print(f"\nno trace: OPA fails on this input: {opa}")
            for text in describe_error(str(opa), sources):
                print(f"  {text}")
        else:
            if engine == "embedded" and opa != primary:
                print(f"\nNOTE: OPA decides this input differently from {engine_name}: "
                      f"{_decision_text(opa)}")
            print(f"\nrules of data.{package} that decided (OPA trace, in evaluation order; "
                  "held = the rule body succeeded, failed = the expression that stopped it):")
            for text in explain_decision(events, sources, entrypoint):
                print(text)
        print("\npolicy input:")
        print(json.dumps(policy_input, indent=2, sort_keys=True))
    return rc


def _opa_decide(sources: PolicySources, entrypoint: str, policy_input: Any, *,
                trace: bool) -> tuple[tuple[bool, Any] | PolicyError, list[dict[str, Any]]]:
    try:
        with ReferenceEngine(sources) as ref:
            defined, value, events = ref.evaluate(entrypoint, policy_input, trace=trace)
    except PolicyError as exc:
        return exc, []
    return (defined, value), events


def _decision_text(outcome: tuple[bool, Any] | PolicyError | None) -> str:
    if not isinstance(outcome, tuple):
        return f"error: {outcome}"
    defined, value = outcome
    return json.dumps(value, sort_keys=True) if defined else "<undefined>"


def _refused_before_policy(exc: GatewayError) -> int:
    detail = exc.to_rpc_error()["data"]
    extra = "".join(f", {k}={v}" for k, v in detail.items() if k != "reason")
    print(f"ERROR: the gateway would refuse this request before the policy: "
          f"{exc.code} (HTTP {exc.http_status}{extra}): {exc.message}", file=sys.stderr)
    return 2
