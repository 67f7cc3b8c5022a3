"""Workflow files (``workflows/*.yaml``): parse, check, and the reference syntax.

A workflow is one YAML document; every problem is a :class:`SpecError` naming the file and the
key (``workflows/x.yaml: steps[2].arguments.path: ...``). Nothing here talks to the network or
evaluates code: references are ``${root.seg.seg}`` paths looked up in plain dicts.

References (``docs/workflows.md``): ``${inputs.<name>...}``, ``${steps.<id>.output...}``,
``${run.id}``. A string that is exactly one reference takes the referenced value with its JSON
type; a reference inside a longer string is replaced by the value's text (a string as is, anything
else as compact JSON). ``$${`` writes a literal ``${``.

A step's ``output_schema`` (JSON Schema) is checked against its output before anything uses it: a
server answering something else (a compromised ERP aiming an id at another file path) fails the
step instead of steering later steps or its own compensation. References into such an output are
checked at load against the properties the schema declares.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from mcp_servers.core.schema import SchemaValidator

MAX_FILE_BYTES = 256 * 1024
MAX_STEPS = 50
MAX_RETRIES = 5
MAX_TIMEOUT_SECONDS = 600.0
DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_MESSAGE_CHARS = 2000
MAX_DEPTH = 32
# The argument every workflow tool takes besides its inputs: a retried call with the same key
# returns the first run's answer instead of running again.
IDEMPOTENCY_ARGUMENT = "idempotency_key"
# The workflow server's own name: a step may not call a workflow (no recursion through the gateway).
SELF_SERVER = "workflow"

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
_SERVER = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")
_TOOL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,127}\Z")
_REF = re.compile(r"\$\$\{|\$\{([^{}]*)\}")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")


class SpecError(ValueError):
    """A workflow file that cannot be used: ``where`` is ``<file>: <key>``."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


# ---------------------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class Ref:
    """One ``${...}`` reference: its root (inputs, steps, run) and the path below it."""

    text: str
    root: str
    path: tuple[str, ...]

    @property
    def step(self) -> str | None:
        return self.path[0] if self.root == "steps" else None


def parse_ref(text: str, where: str) -> Ref:
    parts = text.split(".")
    if not all(_SEGMENT.match(p) for p in parts):
        raise SpecError(where, f"reference ${{{text}}}: segments are letters, digits, '_' and '-', "
                               "separated by '.'")
    root, rest = parts[0], tuple(parts[1:])
    if root == "inputs":
        if not rest:
            raise SpecError(where, f"reference ${{{text}}}: name an input (${{inputs.<name>}})")
    elif root == "steps":
        if len(rest) < 2 or rest[1] != "output":
            raise SpecError(where, f"reference ${{{text}}}: a step's value is ${{steps.<id>.output...}}")
    elif root == "run":
        if rest != ("id",):
            raise SpecError(where, f"reference ${{{text}}}: the run offers only ${{run.id}}")
    else:
        raise SpecError(where, f"reference ${{{text}}}: unknown root {root!r} (inputs, steps or run)")
    return Ref(text, root, rest)


def refs_in(value: Any, where: str, depth: int = 0) -> Iterator[tuple[str, Ref]]:
    """Every reference inside ``value`` (strings of nested lists and dicts), with its key."""
    if depth > MAX_DEPTH:
        raise SpecError(where, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        for m in _REF.finditer(value):
            if m.group(0) != "$${":
                yield where, parse_ref(m.group(1), where)
        if "${" in _REF.sub("", value):
            raise SpecError(where, "an unterminated '${' (write '$${' for a literal '${')")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from refs_in(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpecError(where, f"key {key!r} is not a string")
            yield from refs_in(item, f"{where}.{key}", depth + 1)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise SpecError(where, f"{type(value).__name__} is not a JSON value")


class MissingValue(LookupError):
    """A reference whose value is not there at run time (an absent optional input, a key the
    step's output lacks)."""

    def __init__(self, ref: str) -> None:
        super().__init__(f"${{{ref}}} has no value")
        self.ref = ref


def _lookup(scope: Mapping[str, Any], ref: Ref) -> Any:
    value: Any = scope.get(ref.root)
    for seg in ref.path:
        if isinstance(value, dict) and seg in value:
            value = value[seg]
        elif isinstance(value, list) and seg.isdigit() and int(seg) < len(value):
            value = value[int(seg)]
        else:
            raise MissingValue(ref.text)
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def resolve(value: Any, scope: Mapping[str, Any]) -> Any:
    """``value`` with every reference replaced from ``scope`` ({inputs, steps, run})."""
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole is not None and whole.group(0) != "$${":
            return _lookup(scope, parse_ref(whole.group(1), "value"))

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            return _as_text(_lookup(scope, parse_ref(m.group(1), "value")))
        return _REF.sub(sub, value)
    if isinstance(value, list):
        return [resolve(v, scope) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, scope) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class Call:
    """A tool call on a server behind the gateway; ``arguments`` may hold references."""

    server: str
    tool: str
    arguments: dict[str, Any]
    timeout_seconds: float


@dataclass(frozen=True, slots=True)
class Step:
    id: str
    call: Call | None  # None: an approval step
    approval: str | None = None  # the question asked (may hold references)
    depends_on: tuple[str, ...] = ()
    idempotent: bool = False
    retries: int = 0
    compensate: Call | None = None
    # What the step's output must be before it is used (None: not checked).
    output_schema: SchemaValidator | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        if self.call is None:
            return f"{self.id} (approval)"
        return f"{self.id} ({self.call.server}/{self.call.tool})"


@dataclass(frozen=True, slots=True)
class Workflow:
    name: str
    description: str
    input_schema: dict[str, Any]
    steps: tuple[Step, ...]  # in execution order
    output: Any = None  # what a successful run answers (None: every step's output)
    source: str = ""
    title: str | None = None
    validator: SchemaValidator | None = field(default=None, compare=False, repr=False)
    # "<key>: <what>" for each use of an unchecked step output in arguments (unchecked_output_refs).
    unchecked_refs: tuple[str, ...] = ()

    def tool_schema(self) -> dict[str, Any]:
        """The tool's inputSchema: the workflow's inputs plus the idempotency key."""
        schema = dict(self.input_schema)
        props = dict(schema.get("properties", {}))
        props[IDEMPOTENCY_ARGUMENT] = {
            "type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[\\x21-\\x7e]+$",
            "description": "Retrying with the same key returns the first run's answer; the "
                           "workflow never runs twice for one key (per caller)."}
        schema["properties"] = props
        return schema

    def calls(self) -> Iterator[tuple[str, Call]]:
        """Every tool call the workflow may make, with its key (steps and compensations)."""
        for i, step in enumerate(self.steps):
            if step.call is not None:
                yield f"steps[{i}]", step.call
            if step.compensate is not None:
                yield f"steps[{i}].compensate", step.compensate


# ---------------------------------------------------------------------------- loading

_TOP_KEYS = {"name", "title", "description", "input_schema", "steps", "output"}
_STEP_KEYS = {"id", "server", "tool", "arguments", "timeout_seconds", "depends_on", "idempotent",
              "retries", "compensate", "approval", "output_schema"}
_CALL_KEYS = {"server", "tool", "arguments", "timeout_seconds"}


def _only(data: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(where, "must be a mapping")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}" if where else unknown[0],
                        f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return data


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _string(data: dict[str, Any], key: str, where: str, *, required: bool = True,
            pattern: re.Pattern[str] | None = None, max_len: int = MAX_MESSAGE_CHARS) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise SpecError(_key(where, key), "is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise SpecError(_key(where, key), "must be a non-empty string")
    if len(value) > max_len:
        raise SpecError(_key(where, key), f"longer than {max_len} characters")
    if pattern is not None and not pattern.match(value):
        raise SpecError(_key(where, key), f"{value!r} does not match {pattern.pattern}")
    return value


def _timeout(data: dict[str, Any], where: str) -> float:
    value = data.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value <= MAX_TIMEOUT_SECONDS:
        raise SpecError(_key(where, "timeout_seconds"), f"must be a number in (0, {MAX_TIMEOUT_SECONDS:g}]")
    return float(value)


def _call(data: dict[str, Any], where: str) -> Call:
    server = _string(data, "server", where, pattern=_SERVER)
    tool = _string(data, "tool", where, pattern=_TOOL)
    assert server is not None and tool is not None
    if server == SELF_SERVER:
        raise SpecError(_key(where, "server"), "a workflow step may not call the workflow server")
    arguments = data.get("arguments", {})
    if not isinstance(arguments, dict):
        raise SpecError(_key(where, "arguments"), "must be a mapping")
    return Call(server, tool, arguments, _timeout(data, where))


def _step(raw: Any, where: str) -> Step:
    data = _only(raw, _STEP_KEYS, where)
    sid = _string(data, "id", where, pattern=_NAME)
    assert sid is not None
    depends = data.get("depends_on", [])
    if isinstance(depends, str):
        depends = [depends]
    if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
        raise SpecError(_key(where, "depends_on"), "must be a step id or a list of step ids")
    idempotent = data.get("idempotent", False)
    if not isinstance(idempotent, bool):
        raise SpecError(_key(where, "idempotent"), "must be true or false")
    retries = data.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise SpecError(_key(where, "retries"), f"must be an integer 0..{MAX_RETRIES}")
    if retries and not idempotent:
        raise SpecError(_key(where, "retries"), "only a step marked idempotent: true may be retried")
    if "approval" in data:
        extra = sorted(k for k in data if k not in ("id", "approval", "depends_on"))
        if extra:
            raise SpecError(_key(where, extra[0]), "an approval step has only id, approval and depends_on")
        approval = _only(data["approval"], {"message"}, _key(where, "approval"))
        message = _string(approval, "message", _key(where, "approval"))
        return Step(sid, None, approval=message, depends_on=tuple(depends))
    call = _call({k: v for k, v in data.items() if k in _CALL_KEYS}, where)
    compensate = None
    if "compensate" in data:
        cwhere = _key(where, "compensate")
        compensate = _call(_only(data["compensate"], _CALL_KEYS, cwhere), cwhere)
    output_schema = None
    if "output_schema" in data:
        raw_schema = data["output_schema"]
        if not isinstance(raw_schema, dict):
            raise SpecError(_key(where, "output_schema"), "must be a JSON Schema (a mapping)")
        try:
            output_schema = SchemaValidator(raw_schema, what="output_schema")
        except ValueError as exc:
            raise SpecError(_key(where, "output_schema"), str(exc)) from None
    return Step(sid, call, depends_on=tuple(depends), idempotent=idempotent, retries=retries,
                compensate=compensate, output_schema=output_schema)


def _order(steps: list[Step], deps: dict[str, set[str]], where: str) -> tuple[Step, ...]:
    """Topological order, file order among the ready ones; a cycle is an error naming it."""
    done: list[Step] = []
    left = list(steps)
    while left:
        ready = [s for s in left if deps[s.id] <= {d.id for d in done}]
        if not ready:
            raise SpecError(_key(where, "steps"), "dependency cycle between "
                            + ", ".join(sorted(s.id for s in left)))
        done.append(ready[0])
        left.remove(ready[0])
    return tuple(done)


def _ancestors(sid: str, deps: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(deps[sid])
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo.extend(deps.get(d, ()))
    return seen


def parse_workflow(raw: Any, source: str) -> Workflow:
    """A workflow from its parsed YAML document; :class:`SpecError` names ``source`` and the key."""
    try:
        wf = _parse(raw)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc.where}", exc.message) from None
    return Workflow(wf.name, wf.description, wf.input_schema, wf.steps, wf.output, source,
                    wf.title, wf.validator, wf.unchecked_refs)


def _parse(raw: Any) -> Workflow:
    data = _only(raw, _TOP_KEYS, "")
    name = _string(data, "name", "", pattern=_NAME)
    description = _string(data, "description", "")
    title = _string(data, "title", "", required=False, max_len=200)
    assert name is not None and description is not None
    schema = data.get("input_schema", {"type": "object", "properties": {}})
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise SpecError("input_schema", "must be a JSON Schema of type object")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise SpecError("input_schema.properties", "must be a mapping")
    if IDEMPOTENCY_ARGUMENT in props:
        raise SpecError(f"input_schema.properties.{IDEMPOTENCY_ARGUMENT}",
                        "is reserved: every workflow tool takes it")
    try:
        validator = SchemaValidator(schema, what="input_schema")
    except ValueError as exc:
        raise SpecError("input_schema", str(exc)) from None
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise SpecError("steps", "must be a non-empty list")
    if len(raw_steps) > MAX_STEPS:
        raise SpecError("steps", f"at most {MAX_STEPS} steps")
    steps = [_step(s, f"steps[{i}]") for i, s in enumerate(raw_steps)]
    index: dict[str, int] = {}
    for i, s in enumerate(steps):
        if s.id in index:
            raise SpecError(f"steps[{i}].id", f"{s.id!r} is also the id of steps[{index[s.id]}]")
        index[s.id] = i
    deps: dict[str, set[str]] = {}
    step_refs: dict[str, list[tuple[str, Ref]]] = {}
    for i, s in enumerate(steps):
        where = f"steps[{i}]"
        for d in s.depends_on:
            if d not in index:
                raise SpecError(f"{where}.depends_on", f"unknown step {d!r}")
            if d == s.id:
                raise SpecError(f"{where}.depends_on", "a step cannot depend on itself")
        refs = list(refs_in(s.call.arguments if s.call else s.approval, f"{where}.arguments"
                            if s.call else f"{where}.approval.message"))
        comp_refs = list(refs_in(s.compensate.arguments, f"{where}.compensate.arguments")) \
            if s.compensate else []
        for key, ref in [*refs, *comp_refs]:
            _check_input(ref, props, key)
            if ref.step is not None and ref.step not in index:
                raise SpecError(key, f"reference ${{{ref.text}}}: unknown step {ref.step!r}")
        # A step runs after every step it references (its compensation may use its own output).
        deps[s.id] = set(s.depends_on) | {r.step for _, r in refs if r.step is not None}
        for key, ref in refs:
            if ref.step == s.id:
                raise SpecError(key, f"reference ${{{ref.text}}}: a step cannot use its own output "
                                     "(its compensation can)")
        step_refs[s.id] = [*refs, *comp_refs]
    ordered = _order(steps, deps, "")
    by_id = {s.id: s for s in steps}
    for s in ordered:
        allowed = _ancestors(s.id, deps) | {s.id}
        for key, ref in step_refs[s.id]:
            if ref.step is None:
                continue
            if ref.step not in allowed:
                raise SpecError(key, f"reference ${{{ref.text}}}: step {ref.step!r} is not one this "
                                     "step depends on")
            if by_id[ref.step].call is None:
                raise SpecError(key, f"reference ${{{ref.text}}}: an approval step has no output")
            _check_output_ref(ref, by_id[ref.step], key)
    output = data.get("output")
    if output is not None:
        for key, ref in refs_in(output, "output"):
            _check_input(ref, props, key)
            if ref.step is not None and (ref.step not in index or by_id[ref.step].call is None):
                raise SpecError(key, f"reference ${{{ref.text}}}: no step {ref.step!r} with an output")
            if ref.step is not None:
                _check_output_ref(ref, by_id[ref.step], key)
    unchecked = tuple(
        f"{key}: ${{{ref.text}}} uses the output of step {ref.step!r}, which has no output_schema "
        "(not checked before use)"
        for s in steps for key, ref in step_refs[s.id]
        if ref.step is not None and ".arguments" in key and by_id[ref.step].output_schema is None)
    return Workflow(name, description, schema, ordered, output, title=title, validator=validator,
                    unchecked_refs=unchecked)


def _check_output_ref(ref: Ref, step: Step, key: str) -> None:
    """A reference into a step with an ``output_schema`` follows what the schema declares: an
    object with ``additionalProperties: false`` has only its ``properties``."""
    if step.output_schema is None:
        return
    schema: Any = step.output_schema.schema
    for seg in ref.path[2:]:  # after <id>.output
        if not isinstance(schema, dict):
            return
        props = schema.get("properties")
        if isinstance(props, dict) and seg in props:
            schema = props[seg]
        elif isinstance(schema.get("prefixItems"), list) and seg.isdigit() \
                and int(seg) < len(schema["prefixItems"]):
            schema = schema["prefixItems"][int(seg)]
        elif isinstance(schema.get("items"), dict) and seg.isdigit():
            schema = schema["items"]
        elif schema.get("additionalProperties") is False and isinstance(props, dict):
            raise SpecError(key, f"reference ${{{ref.text}}}: the output_schema of step "
                                 f"{step.id!r} has no property {seg!r}")
        else:
            return


def unchecked_output_refs(wf: Workflow) -> list[str]:
    """Where ``wf`` uses the output of a step without an ``output_schema`` in a step's or a
    compensation's arguments (``<file>: <key>: ...``): values a server chose, used unchecked."""
    return [f"{wf.source}: {where}" for where in wf.unchecked_refs]


def _check_input(ref: Ref, props: Mapping[str, Any], key: str) -> None:
    if ref.root == "inputs" and ref.path[0] not in props:
        raise SpecError(key, f"reference ${{{ref.text}}}: input_schema has no property {ref.path[0]!r}")


def load_file(path: Path) -> Workflow:
    """Read and parse one workflow file (size bounded, one YAML document, safe loader)."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SpecError(source, f"larger than {MAX_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(source, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise SpecError(source, "is not UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(source, f"is not valid YAML{at}") from None
    return parse_workflow(raw, source)


def load_dir(directory: Path) -> dict[str, Workflow]:
    """Every ``*.yaml`` / ``*.yml`` file of ``directory``; two files naming one workflow is an error."""
    found: dict[str, Workflow] = {}
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    if not directory.is_dir():
        raise SpecError(str(directory), "is not a folder")
    for path in files:
        wf = load_file(path)
        if wf.name in found:
            raise SpecError(f"{path}: name", f"{wf.name!r} is also the name in {found[wf.name].source}")
        found[wf.name] = wf
    return found


def check_targets(wf: Workflow, servers: Mapping[str, frozenset[str] | None]) -> list[str]:
    """Problems with the servers and tools ``wf`` calls: ``servers`` maps each known server to
    its known tools (None: its tools are not known here, only the server is checked)."""
    problems = []
    for key, call in wf.calls():
        if call.server not in servers:
            problems.append(f"{wf.source}: {key}.server: unknown server {call.server!r} "
                            f"(configured: {', '.join(sorted(servers)) or 'none'})")
            continue
        tools = servers[call.server]
        if tools is not None and call.tool not in tools:
            problems.append(f"{wf.source}: {key}.tool: server {call.server!r} has no tool "
                            f"{call.tool!r} (known: {', '.join(sorted(tools)) or 'none'})")
    return problems
