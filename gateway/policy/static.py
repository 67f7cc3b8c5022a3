"""Static checks of a policy folder (``mcp-gateway policy check``): see run_check.

rego-cpp, which serves the decisions, compiles policies that OPA refuses: a misspelt rule name
in ``not sql_to_long`` is an unknown variable it treats as undefined, so the negation is always
true and a limit is silently switched off. The check therefore compiles the folder with OPA
itself in strict mode (``gateway.policy.reference``) and adds what no compiler reports, from
OPA's parsed module AST:

* a ``data.`` path that no rule, package, data.json key or data.schema.json property defines
  (``data.gateway.confinig_roles``), with the nearest existing key as a hint, and a key looked up
  in a data.json value that is not an object (always undefined);
* the configured entrypoint when no module defines it;
* rules of the non-test modules that nothing refers to (a warning: a rule meant to take part in
  the decision and forgotten, or a misspelt reference that OPA saw as a new rule);
* the constructs that decide differently on rego-cpp and OPA (``gateway.policy.parity_check``);
* what rego-cpp itself refuses to compile in the serving modules.

Findings of a kind in WARNING_KINDS are warnings: they are printed, do not fail the check (unless
``--strict``) and do not stop a bundle from loading; every other finding is an error.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from gateway.policy import parity_check
from gateway.policy.errors import PolicyCompileError, PolicyError
from gateway.policy.reference import Finding, ReferenceEngine, ReferenceUnavailable, standalone_query
from gateway.policy.rego import (
    DATA_SCHEMA,
    ENTRYPOINT_RE,
    CompiledPolicy,
    PolicyModule,
    PolicySources,
    _data_document,
    _policy_files,
    load_sources,
)

# Kinds of the findings this module adds (OPA's own keep OPA's codes: rego_parse_error, ...).
UNDEFINED_DATA_REF = "rego_undefined_data_ref"
DATA_TYPE_ERROR = "rego_data_type_error"
UNDEFINED_ENTRYPOINT = "rego_undefined_entrypoint"
UNUSED_RULE = "rego_unused_rule"
SERVING_COMPILE_ERROR = "regocpp_compile_error"
DATA_SCHEMA_ERROR = "data_schema_error"
LOAD_ERROR = "policy_load_error"
REFERENCE_UNAVAILABLE = "reference_unavailable"
# A data key that neither data.json nor a schema names, in a folder without data.schema.json:
# it may be an optional key the Rego reads with a default (nothing says it is not), so warned.
UNSCHEMATIZED_DATA_REF = "rego_unknown_data_ref"
WARNING_KINDS = frozenset({UNUSED_RULE, UNDEFINED_ENTRYPOINT, UNSCHEMATIZED_DATA_REF})

# The list filters ext_proc queries besides policy.entrypoint (ext_proc.settings
# DEFAULT_LIST_ENTRYPOINTS; a test keeps the two in step): rules nothing else refers to.
LIST_ENTRYPOINTS = ("mcp/authz/visible_tools", "mcp/authz/visible_prompts",
                    "mcp/authz/visible_resources")

_DATA_POINTER_RE = re.compile(r"^(?P<file>[^\s:]*\.json): (?P<rest>.*)$")
_FILE_PREFIX_RE = re.compile(r"^(?P<file>[^\s:]+\.(?:rego|json)): (?P<rest>.*)$")
# rego-cpp's errors as rego.py formats them: "authz.rego:12:3: message".
_SERVING_ERROR_RE = re.compile(r"^(?P<file>[^\s:][^:]*\.rego):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$")
_PARSE_QUERY = "asts := [rego.parse_module(m.name, m.source) | some m in input]"
MAX_HINT_KEYS = 8

Path_ = tuple[str, ...]  # a data path without the leading ``data``
RefPath = tuple[str | None, ...]  # the same with None for a key not known statically (``[r]``)


def is_warning(finding: Finding) -> bool:
    return finding.kind in WARNING_KINDS


def describe(finding: Finding) -> str:
    """``file:line: message (kind)``; ``file: message (kind)`` when no line applies (data.json)."""
    if finding.file and finding.line:
        return str(finding)
    where = f"{finding.file}: " if finding.file else ""
    return f"{where}{finding.message} ({finding.kind})"


def errors(findings: Iterable[Finding]) -> list[Finding]:
    """The findings that fail the check and refuse a bundle (every kind but the warnings)."""
    return [f for f in findings if not is_warning(f)]


def run_check(policy_dir: str | os.PathLike[str], entrypoint: str, *,
              extra_entrypoints: Sequence[str] = LIST_ENTRYPOINTS) -> list[Finding]:
    """Every problem found in the folder without deploying it; empty when it may be loaded.

    ``entrypoint`` must be defined; ``extra_entrypoints`` (the list filters) count as used but
    may be absent. Policy problems are findings, never exceptions.
    """
    findings, sources = _load(policy_dir)
    if sources is not None:
        findings.extend(check_sources(sources, entrypoint, extra_entrypoints=extra_entrypoints))
    return findings


def check_sources(sources: PolicySources, entrypoint: str, *,
                  extra_entrypoints: Sequence[str] = LIST_ENTRYPOINTS,
                  serving_compile: bool = True) -> list[Finding]:
    """The checks of run_check on an already loaded folder (tests included in ``sources``).

    ``serving_compile``: also compile the non-test modules with rego-cpp (the checker child of
    the embedded engine builds them itself, isolated from crashes, so it passes False).
    """
    findings = _reference_findings(sources)
    modules: list[_Module] = []
    # The AST checks need every module parsed: with one missing, every reference into it would
    # look undefined. Parse errors come first.
    if not any(f.kind in ("rego_parse_error", REFERENCE_UNAVAILABLE) for f in findings):
        modules = _parse(sources.modules)
    if modules:
        tree = _Tree.build(sources, modules)
        findings.extend(_entrypoint_findings(tree, modules, entrypoint))
        findings.extend(_data_ref_findings(tree, modules))
        findings.extend(_unused_rule_findings(tree, modules, [entrypoint, *extra_entrypoints]))
    findings.extend(parity_check.findings(sources))
    if serving_compile and modules and ENTRYPOINT_RE.match(entrypoint):
        crashing = _crashing_constructs(modules)
        findings.extend(crashing)
        serving = {m.name for m in sources.modules if not m.is_test}
        # Only when OPA accepts the serving modules: rego-cpp's errors in a module OPA refused
        # repeat OPA's, less clearly.
        if not crashing and not any(f.file in serving for f in errors(findings)):
            findings.extend(_serving_findings(sources, entrypoint))
    return findings


# ---------------------------------------------------------------- loading


def _load(policy_dir: str | os.PathLike[str]) -> tuple[list[Finding], PolicySources | None]:
    """The folder's sources and the load problems as findings; a data.json that breaks its
    schema is reported and the Rego is still checked."""
    try:
        return [], load_sources(policy_dir, include_tests=True)
    except PolicyCompileError as exc:
        findings = _load_findings(str(exc))
    try:
        return findings, _sources_unchecked(Path(policy_dir))
    except PolicyCompileError:
        return findings, None


def _load_findings(text: str) -> list[Finding]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        pointer = _DATA_POINTER_RE.match(line)
        if pointer:
            out.append(Finding(pointer["file"], 0, DATA_SCHEMA_ERROR, pointer["rest"]))
            continue
        prefixed = _FILE_PREFIX_RE.match(line)
        if prefixed:
            out.append(Finding(prefixed["file"], 0, LOAD_ERROR, prefixed["rest"]))
        else:
            out.append(Finding("", 0, LOAD_ERROR, line))
    return out


def _sources_unchecked(base: Path) -> PolicySources:
    """The folder as load_sources reads it, without the data schema check and leaving out
    data documents that are not JSON objects (both already reported)."""
    if not base.is_dir():
        raise PolicyCompileError(f"policy folder {base} does not exist")
    modules: list[PolicyModule] = []
    data: list[tuple[str, bytes]] = []
    for path in _policy_files(base):
        rel = path.relative_to(base).as_posix()
        if path.name == DATA_SCHEMA:
            continue
        try:
            raw = path.read_bytes()
            if path.name == "data.json":
                _data_document(rel, raw)
                data.append((rel, raw))
            else:
                modules.append(PolicyModule(rel, raw.decode("utf-8")))
        except (OSError, UnicodeDecodeError, PolicyCompileError):
            continue
    if not modules:
        raise PolicyCompileError(f"no readable .rego files in {base}")
    return PolicySources(str(base), tuple(modules), tuple(data))


def _reference_findings(sources: PolicySources) -> list[Finding]:
    """OPA's strict compile of every module, tests included."""
    try:
        engine = ReferenceEngine(sources, include_tests=True)
    except ReferenceUnavailable as exc:
        return [Finding("", 0, REFERENCE_UNAVAILABLE, f"{exc}; the check cannot pass without it")]
    except PolicyCompileError as exc:  # a data document OPA refuses
        return [Finding("", 0, LOAD_ERROR, str(exc))]
    with engine:
        return list(engine.findings)


# ---------------------------------------------------------------- the AST


@dataclass(frozen=True, slots=True)
class _Module:
    module: PolicyModule
    package: Path_
    ast: Mapping[str, Any]
    aliases: Mapping[str, Path_]  # import alias -> data path it stands for
    code_lines: tuple[str, ...]  # the source with comments blanked, for line numbers
    refs: tuple[tuple[str, RefPath], ...] = ()  # (head var, static segments) of every var and ref

    @property
    def name(self) -> str:
        return self.module.name

    def rules(self) -> Iterator[tuple[Path_, Mapping[str, Any]]]:
        """(static head path, rule) of each rule: ``("decision",)``, ``("p", "q")`` for p.q := 1."""
        for rule in self.ast.get("rules", ()):
            yield _statics(rule.get("head", {}).get("ref", ())), rule

    def line_of(self, pattern: re.Pattern[str]) -> list[int]:
        return [n for n, text in enumerate(self.code_lines, 1) if pattern.search(text)]


def _parse(modules: Sequence[PolicyModule]) -> list[_Module]:
    """OPA's AST of each module (one query for all; one by one if one of them does not parse)."""
    if not modules:
        return []
    docs = [{"name": m.name, "source": m.source} for m in modules]
    try:
        asts: list[Any] = list(standalone_query(_PARSE_QUERY, docs)[0]["asts"])
    except PolicyError:  # ReferenceUnavailable included: already a finding
        return []
    out = []
    for module, ast in zip(modules, asts, strict=True):
        if not isinstance(ast, Mapping):
            continue
        aliases: dict[str, Path_] = {}
        for imp in ast.get("imports", ()):
            ref = imp.get("path", {}).get("value", ())
            if not ref or ref[0].get("value") != "data":
                continue
            path = _statics(ref)[1:]
            alias = imp.get("alias") or (path[-1] if path else "")
            if alias:
                aliases[alias] = path
        parsed = _Module(module, _statics(ast.get("package", {}).get("path", ()))[1:], ast,
                         aliases, tuple(_code(line) for line in module.source.splitlines()))
        out.append(replace(parsed, refs=tuple(_refs(parsed))))
    return out


def _code(line: str) -> str:
    """A line without its comment (a ``#`` inside a string hides only the rest of that line)."""
    return line.split("#", 1)[0]


def _statics(terms: Iterable[Mapping[str, Any]]) -> Path_:
    """The leading static segments of a ref: its head var, then the string keys up to the first
    key that is not a string (a variable, a number, a call)."""
    out: list[str] = []
    for term in terms:
        wanted = "var" if not out else "string"
        if term.get("type") != wanted or not isinstance(term.get("value"), str):
            break
        out.append(term["value"])
    return tuple(out)


def _walk(node: Any, *, in_head: bool = False) -> Iterator[Mapping[str, Any]]:
    """Every var and ref of a rule, a ref's head var not again on its own, leaving out the
    rule's own name in its head (and in its else heads)."""
    if isinstance(node, Mapping):
        if node.get("type") == "var":
            yield node
            return
        if node.get("type") == "ref" and isinstance(node.get("value"), list):
            yield node
            terms = node["value"]
            for term in terms[1:] if terms and terms[0].get("type") == "var" else terms:
                yield from _walk(term)
            return
        for key, value in node.items():
            if in_head and key == "name":
                continue
            if in_head and key == "ref" and isinstance(value, list):
                for term in value[1:]:
                    yield from _walk(term)
                continue
            yield from _walk(value, in_head=key == "head")
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _refs(module: _Module) -> Iterator[tuple[str, RefPath]]:
    """Each (head var, segments) of the refs and bare vars of the module's rules; a segment that
    is not a string (a variable, a number, a call) is None: any key."""
    for _, rule in module.rules():
        for term in _walk(rule):
            value = term.get("value")
            if term["type"] == "var" and isinstance(value, str):
                yield value, ()
            elif term["type"] == "ref" and isinstance(value, list) and value:
                head = value[0]
                if head.get("type") != "var" or not isinstance(head.get("value"), str):
                    continue
                segments = [t["value"] if t.get("type") == "string" and isinstance(t.get("value"), str)
                            else None for t in value[1:]]
                while segments and segments[-1] is None:
                    segments.pop()
                yield head["value"], tuple(segments)


def _static_prefix(path: RefPath) -> Path_:
    out = []
    for seg in path:
        if seg is None:
            break
        out.append(seg)
    return tuple(out)


def _show(path: RefPath) -> str:
    return "data" + "".join(f".{seg}" if seg is not None else "[_]" for seg in path)


# ---------------------------------------------------------------- what data.* holds


@dataclass(slots=True)
class _Tree:
    """Everything a ``data.`` path can name: packages, rules, data.json values, schema keys."""

    packages: set[Path_] = field(default_factory=set)
    rules: dict[Path_, list[tuple[_Module, Path_]]] = field(default_factory=dict)
    by_name: dict[tuple[Path_, str], list[Path_]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    schemas: list[tuple[Path_, Mapping[str, Any]]] = field(default_factory=list)

    @classmethod
    def build(cls, sources: PolicySources, modules: Sequence[_Module]) -> _Tree:
        tree = cls()
        for m in modules:
            tree.packages.add(m.package)
            for head, _ in m.rules():
                if head:
                    path = m.package + head
                    if path not in tree.rules:
                        tree.by_name.setdefault((m.package, head[0]), []).append(path)
                    tree.rules.setdefault(path, []).append((m, head))
        root = Path(sources.root)
        for name, raw in sources.data:
            try:
                document = orjson.loads(_data_document(name, raw))
            except PolicyCompileError:
                continue
            _merge(tree.data, document)
            try:
                schema = orjson.loads((root / Path(name).with_name(DATA_SCHEMA)).read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            if isinstance(schema, dict):
                tree.schemas.append((tuple(Path(name).parent.parts), schema))
        return tree

    def rule_prefix(self, ref: RefPath) -> Path_ | None:
        """The rule path ``ref`` starts with, if any."""
        path = _static_prefix(ref)
        for i in range(len(path), 0, -1):
            if path[:i] in self.rules:
                return path[:i]
        return None

    def children(self, prefix: Path_) -> set[str]:
        """The names packages and rules define right under ``prefix``."""
        n = len(prefix)
        return {p[n] for p in (*self.packages, *self.rules) if len(p) > n and p[:n] == prefix}

    def check(self, path: RefPath) -> tuple[int, str] | None:
        """None when ``path`` may be defined; else (index of the first bad segment, why).

        Walks packages and rules, the merged data.json documents and their schemas side by side:
        a key is fine when any of them names it or a schema admits any key there (a role or a
        server name); a key not known statically (None) stands for every key there. The walk
        ends, fine, at a rule (its value is not known statically) or where nothing is known.
        """
        nodes: list[Any] = [self.data]  # the data.json values the path so far can name
        carried: list[tuple[Mapping[str, Any], Any]] = []  # (schema document, schema of the path)
        for i, seg in enumerate(path):
            prefix = path[:i]
            static = None not in prefix
            if static and prefix and prefix in self.rules:
                return None
            virtual = self.children(_static_prefix(prefix)) if static else set()
            schemas = carried + [(s, s) for base, s in self.schemas if static and base == prefix]
            if not nodes and not schemas and not virtual:
                return None
            carried = []
            children = [_schema_children(document, schema) + (document,) for document, schema in schemas]
            if seg is None:
                if virtual:
                    return None  # data.mcp[x]: any package or rule
                nodes = [v for n in nodes if isinstance(n, (dict, list))
                         for v in (n.values() if isinstance(n, dict) else n)]
                for props, other, document in children:
                    more = [*props.values(), *([other] if other is not None else [])]
                    carried.extend((document, sub) for sub in more or [_ANY])
                continue
            keys = set(virtual)
            admitted = False
            for props, other, document in children:
                keys.update(props)
                if seg in props:
                    carried.append((document, props[seg]))
                elif other is not None:
                    admitted = True
                    carried.append((document, other))
            objects = [n for n in nodes if isinstance(n, dict)]
            for n in objects:
                keys.update(n)
            if seg not in keys and not admitted:
                if nodes and not objects and not virtual:
                    kind = "an array" if isinstance(nodes[0], list) else f"a {type(nodes[0]).__name__}"
                    return i, (f"{_show(prefix)} is {kind} in data.json: {_show(path[:i + 1])} "
                               "is always undefined")
                return i, _missing_message(path[:i + 1], keys)
            nodes = [n[seg] for n in objects if seg in n]
        return None


_MISSING = object()


def _merge(into: dict[str, Any], document: Mapping[str, Any]) -> None:
    for key, value in document.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


_ANY: Mapping[str, Any] = {}  # the schema of a value nothing is known about


def _schema_children(document: Mapping[str, Any], schema: Any,
                     depth: int = 0) -> tuple[dict[str, Any], Any]:
    """(the keys a JSON Schema names, with their schemas; the schema of any other key, or None
    when it admits no other key). Local ``$ref``, ``allOf`` (every part must admit a key) and
    ``anyOf``/``oneOf`` (one part must) are followed; anything else admits every key."""
    if not isinstance(schema, Mapping) or depth > 32:
        return {}, _ANY
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#/"):
            return {}, _ANY
        target: Any = document
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        return _schema_children(document, target, depth + 1)
    props: dict[str, Any] = dict(schema.get("properties") or {})
    kind = schema.get("type")
    other: Any
    if kind is not None and kind != "object" and not (isinstance(kind, list) and "object" in kind):
        other = None  # an array, a string, ...: no key at all
    else:
        additional = schema.get("additionalProperties", True)
        if additional is False and not schema.get("patternProperties"):
            other = None
        else:
            other = additional if isinstance(additional, Mapping) else _ANY
    for part in schema.get("allOf") or ():
        more, part_other = _schema_children(document, part, depth + 1)
        props.update(more)
        if part_other is None:
            other = None
    alternatives = [_schema_children(document, part, depth + 1)
                    for key in ("anyOf", "oneOf") for part in schema.get(key) or ()]
    if alternatives:
        for more, _ in alternatives:
            props.update(more)
        if all(part_other is None for _, part_other in alternatives):
            other = None
    return props, other


def _missing_message(path: RefPath, siblings: set[str]) -> str:
    where, name = _show(path[:-1]), str(path[-1])
    message = (f"{_show(path)} is not defined: no rule, package, data.json key or "
               f"{DATA_SCHEMA} property {name!r} under {where}")
    close = difflib.get_close_matches(name, sorted(siblings), n=1, cutoff=0.6)
    if close:
        return f"{message} (did you mean {where}.{close[0]}?)"
    if siblings:
        names = sorted(siblings)
        more = f", ... ({len(names)} keys)" if len(names) > MAX_HINT_KEYS else ""
        return f"{message} (it holds {', '.join(names[:MAX_HINT_KEYS])}{more})"
    return message


def _ref_pattern(head: str, segments: RefPath) -> re.Pattern[str]:
    """The source text of a ref: ``data.a.b``, ``data["a"].b``, ``data.a[x].b``, spaces allowed."""
    parts = [rf"(?<![\w.]){re.escape(head)}"]
    for seg in segments:
        if seg is None:
            parts.append(r"\s*\[[^\]]*\]")
        else:
            parts.append(rf"(?:\s*\.\s*{re.escape(seg)}\b|\s*\[\s*\"{re.escape(seg)}\"\s*\])")
    return re.compile("".join(parts))


# ---------------------------------------------------------------- the checks


def _entrypoint_findings(tree: _Tree, modules: Sequence[_Module], entrypoint: str) -> list[Finding]:
    if not ENTRYPOINT_RE.match(entrypoint):
        return [Finding("", 0, UNDEFINED_ENTRYPOINT,
                        f"policy.entrypoint {entrypoint!r} is not a path like mcp/authz/decision")]
    path = tuple(entrypoint.split("/"))
    if tree.rule_prefix(path) is not None:
        return []
    package = path[:-1]
    files = [m.name for m in modules if m.package == package and not m.module.is_test]
    close = difflib.get_close_matches(path[-1], sorted(tree.children(package)), n=1, cutoff=0.6)
    hint = f" (did you mean data.{'.'.join((*package, close[0]))}?)" if close else ""
    where = f"package {'.'.join(package)} ({', '.join(files)})" if files else "any module"
    return [Finding(files[0] if files else "", 0, UNDEFINED_ENTRYPOINT,
                    f"the entrypoint data.{'.'.join(path)} (policy.entrypoint {entrypoint}) is not "
                    f"defined by {where}: every decision would be undefined{hint}")]


def _data_ref_findings(tree: _Tree, modules: Sequence[_Module]) -> list[Finding]:
    out: list[Finding] = []
    for m in modules:
        seen: set[RefPath] = set()
        for head, segments in m.refs:
            if head == "data":
                base: Path_ = ()
            elif head in m.aliases:
                base = m.aliases[head]
            else:
                continue
            path = base + segments
            problem = tree.check(path)
            if problem is None or path[:problem[0] + 1] in seen:
                continue
            index, message = problem
            seen.add(path[:index + 1])
            if message.endswith("always undefined"):
                kind = DATA_TYPE_ERROR
            elif tree.schemas:
                kind = UNDEFINED_DATA_REF
            else:  # no schema says which keys exist: optional or misspelt, nothing tells
                kind = UNSCHEMATIZED_DATA_REF
                message += (f"; with no {DATA_SCHEMA} beside data.json it may be an optional key: "
                            f"add a schema to make this an error")
            # The ref as written up to the bad key (the import line when the alias is bad), else
            # any line naming the bad key.
            if index >= len(base):
                pattern = _ref_pattern(head, segments[:index - len(base) + 1])
            else:
                pattern = _ref_pattern("data", path[:index + 1])
            bad = re.escape(str(path[index]))
            lines = m.line_of(pattern) or m.line_of(re.compile(rf'\.\s*{bad}\b|\[\s*"{bad}"')) or [0]
            out.extend(Finding(m.name, n, kind, message) for n in lines)
    return out


def _unused_rule_findings(tree: _Tree, modules: Sequence[_Module],
                          entrypoints: Sequence[str]) -> list[Finding]:
    used: set[Path_] = {tuple(ep.split("/")) for ep in entrypoints}
    whole: set[Path_] = set()  # data paths referred to as a whole (a package, data.mcp[x])
    for m in modules:
        for head, segments in m.refs:
            if head == "data" or head in m.aliases:
                path = _static_prefix((() if head == "data" else m.aliases[head]) + segments)
                rule = tree.rule_prefix(path)
                if rule is not None:
                    used.add(rule)
                elif path:
                    whole.add(path)
            else:  # a rule of the module's own package, by name
                used.update(tree.by_name.get((m.package, head), ()))
    out = []
    for path, defs in tree.rules.items():
        module, rule_head = defs[0]
        if module.module.is_test or path in used or any(path[:len(w)] == w for w in whole):
            continue
        # a rule with a ref head (p.q := 1) counts as used when p or p.q is
        if any(path[:len(u)] == u for u in used if len(u) > len(module.package)):
            continue
        name = rule_head[0]
        lines = (module.line_of(re.compile(rf"^(?:default\s+)?{re.escape(name)}\b"))
                 or module.line_of(re.compile(rf"\b{re.escape(name)}\b")) or [0])
        out.append(Finding(module.name, lines[0], UNUSED_RULE,
                           f"rule {'.'.join(rule_head)} (data.{'.'.join(path)}) is never used: no module "
                           "refers to it and it is not an entrypoint"))
    return out


def _crashing_constructs(modules: Sequence[_Module]) -> list[Finding]:
    """``with input as ...`` aborts rego-cpp while it compiles (the whole process, not an error)."""
    out: list[Finding] = []
    pattern = re.compile(r"\bwith\s+input\s+as\b")
    for m in modules:
        if not m.line_of(pattern):
            continue
        whole_input = any(
            w.get("target", {}).get("value") == [{"type": "var", "value": "input"}]
            for _, rule in m.rules() for node in _nodes(rule) for w in node.get("with") or ())
        if whole_input:
            out.extend(Finding(m.name, n, SERVING_COMPILE_ERROR,
                               "`with input as ...` makes rego-cpp (the serving engine) abort; "
                               "replace the fields you need one by one (`with input.mcp as ...`)")
                       for n in m.line_of(pattern) or [0])
    return out


def _nodes(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _nodes(item)


def _serving_findings(sources: PolicySources, entrypoint: str) -> list[Finding]:
    """What rego-cpp refuses in the serving modules (never the tests: ~5 s and 2.5 GB)."""
    try:
        CompiledPolicy(sources, [entrypoint])
    except PolicyCompileError as exc:
        out = []
        for line in str(exc).splitlines():
            match = _SERVING_ERROR_RE.match(line)
            if match:
                out.append(Finding(match["file"], int(match["line"]), SERVING_COMPILE_ERROR,
                                   f"rego-cpp (the serving engine) refuses this: {match['msg']} "
                                   f"(column {match['col']})"))
            elif line.strip():
                out.append(Finding("", 0, SERVING_COMPILE_ERROR,
                                   f"rego-cpp (the serving engine) refuses the policy: {line.strip()}"))
        return out
    except PolicyError as exc:
        return [Finding("", 0, SERVING_COMPILE_ERROR,
                        f"rego-cpp (the serving engine) fails on the policy: {exc}")]
    return []
