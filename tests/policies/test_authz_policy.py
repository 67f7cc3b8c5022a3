"""The shipped policy, evaluated as the gateway evaluates it: cases rego-cpp cannot run as Rego
unit tests (see policies/README.md), and the grants-only-open-the-door property."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.policy.decision import check_decision
from gateway.policy.facts import with_facts
from gateway.policy.rego import CompiledPolicy, load_sources

POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return CompiledPolicy(load_sources(POLICIES, include_tests=False),
                          ["mcp/authz/decision", "mcp/authz/denials"])


def call(args: dict[str, Any], roles: list[str], server: str = "files",
         tool: str = "read_file") -> dict[str, Any]:
    return {"mcp": {"kind": "request", "method": "tools/call", "tool": tool, "arguments": args},
            "token": {"sub": "a", "roles": roles, "scope": f"tools:call:{server}/*", "tenant": "acme"},
            "server": {"name": server}}


@pytest.mark.parametrize("path", ["shared\\..\\x", "shared\\a", 42, None, ["shared"],
                                  "shared/a/../../b", "/shared"])
def test_malformed_paths_denied_even_for_admin(policy: CompiledPolicy, path: Any) -> None:
    """Backslashes, NUL, '..' and non-string paths are refused whatever the role."""
    defined, value = policy.evaluate("mcp/authz/decision", call({"path": path}, ["admin"]))
    d = check_decision(value, defined=defined)
    assert not d.allow and d.reason == "path_invalid"


@pytest.mark.parametrize("inp", [
    {},
    {"mcp": None, "token": None, "server": None},
    {"mcp": {"method": "tools/call", "tool": 5}, "token": {"roles": "admin"}, "server": {"name": "files"}},
    {"mcp": {"method": ["tools/call"]}, "token": {"roles": ["admin"], "tenant": "acme"},
     "server": {"name": "files"}},
    {"mcp": {"method": "tools/call", "tool": "read_file", "arguments": "x"},
     "token": {"roles": ["admin"], "tenant": "acme", "scope": "tools:call:files/*"},
     "server": {"name": "files"}},
])
def test_odd_inputs_deny_within_contract(policy: CompiledPolicy, inp: dict[str, Any]) -> None:
    """Unexpected input shapes still produce a contract-conforming deny."""
    defined, value = policy.evaluate("mcp/authz/decision", inp)
    assert not check_decision(value, defined=defined).allow


def test_every_denial_is_also_refused(policy: CompiledPolicy) -> None:
    """Where a denial fires, the decision denies (grants alone open the door)."""
    cases = [call({"path": "secret"}, ["viewer"]),
             call({"sql": "select * from x"}, ["analyst"], "database", "query"),
             call({"tenant": "other"}, ["analyst"], "database", "list_tables")]
    for inp in cases:
        _, denials = policy.evaluate("mcp/authz/denials", inp)
        _, value = policy.evaluate("mcp/authz/decision", inp)
        assert denials and value["allow"] is False


def test_nul_in_input_is_refused(policy: CompiledPolicy) -> None:
    """A NUL would truncate the string the policy sees: the engine refuses the input instead."""
    from gateway.policy.errors import PolicyInputError

    with pytest.raises(PolicyInputError):
        policy.evaluate("mcp/authz/decision", call({"path": "shared/\x00/../../etc"}, ["viewer"]))


PATHS = ["shared/a.txt", "./shared//reports/q3.txt", "shared", "", ".", "shared-secrets/a", "projects/x.py",
         "reports/q3", "secret", "tenants", "tenants/acme", "tenants/acme/reports/a.csv",
         "tenants/acme/scratch/x", "tenants/globex/reports/a", "tenants/{tenant}/reports",
         "shared/../secret", "/etc/passwd", "..", "shared/..hidden", "a/.../b", 7, None, ["shared"]]
ROLE_SETS = [["viewer"], ["analyst"], ["engineer"], ["admin"], ["viewer", "engineer"], ["intern"], []]


def _with_facts(inp: dict[str, Any]) -> dict[str, Any]:
    return {**inp, "mcp": with_facts(dict(inp["mcp"]))}


def _decide(policy: CompiledPolicy, inp: dict[str, Any]) -> Any:
    return policy.evaluate("mcp/authz/decision", inp)


def _file_call_cases() -> list[dict[str, Any]]:
    cases = []
    for tool in ("read_file", "write_file", "list_directory", "move"):
        for roles in ROLE_SETS:
            for tenant in ("acme", None):
                for args in [{"path": p} for p in PATHS] + [
                        {}, {"path": "shared/a", "root": "secret"},
                        {"source": "projects/a", "destination": "shared/b"},
                        {"path": "tenants/acme/reports/x", "target": "shared/y"}]:
                    inp = call(args, roles, tool=tool)
                    if tenant is None:
                        del inp["token"]["tenant"]
                    cases.append(inp)
    return cases


def test_gateway_facts_give_the_same_file_decisions(policy: CompiledPolicy) -> None:
    """For every tool call in the corpus, the decision with the gateway's path facts equals the
    decision the policy reaches computing them itself."""
    cases = _file_call_cases()
    assert len(cases) > 1000
    allowed = 0
    for inp in cases:
        plain = _decide(policy, inp)
        assert _decide(policy, _with_facts(inp)) == plain, inp
        allowed += plain[1]["allow"]
    assert allowed > 100  # the corpus exercises grants, not only denials


@pytest.mark.parametrize("uri", ["file:///shared/a.txt", "file:///secret/a", "file:///tenants/acme/reports/x",
                                 "file:///tenants/globex/x", "file:///shared/../x", "ftp:/bad", "file://",
                                 "FILE:///shared/a", None, 5])
@pytest.mark.parametrize("roles", [["viewer"], ["analyst"], ["admin"]])
def test_gateway_facts_give_the_same_resource_decisions(policy: CompiledPolicy, uri: Any,
                                                        roles: list[str]) -> None:
    """resources/read decides the same with the gateway's facts of its URI as without."""
    inp = {"mcp": {"kind": "request", "method": "resources/read", "resource_uri": uri, "arguments": {}},
           "token": {"sub": "a", "roles": roles, "scope": "", "tenant": "acme"}, "server": {"name": "files"}}
    assert _decide(policy, _with_facts(inp)) == _decide(policy, inp)


@pytest.mark.parametrize("uri", ["file:///shared\\bin", "file:///shared/x\\b", "file:///shared\\..\\..\\etc"])
def test_backslash_uri_denied_as_invalid_with_facts(policy: CompiledPolicy, uri: str) -> None:
    """With the gateway's facts a backslash in a resource URI is path_invalid, for admins too
    (rego-cpp 1.5.2 reads backslashes in strings derived from input as escapes: README.md)."""
    inp = {"mcp": {"kind": "request", "method": "resources/read", "resource_uri": uri, "arguments": {}},
           "token": {"sub": "a", "roles": ["admin"], "scope": "", "tenant": "acme"},
           "server": {"name": "files"}}
    defined, value = _decide(policy, _with_facts(inp))
    d = check_decision(value, defined=defined)
    assert not d.allow and d.reason == "path_invalid"


def test_facts_do_not_widen_a_role(policy: CompiledPolicy) -> None:
    """Facts only answer "which prefixes": a role's prefixes still decide (viewer, projects/)."""
    inp = _with_facts(call({"path": "projects/x.py"}, ["viewer"]))
    defined, value = _decide(policy, inp)
    d = check_decision(value, defined=defined)
    assert not d.allow and d.reason == "path_not_allowed"


# ---------------------------------------------------------------- SQL: facts from the parser

def _query(sql: Any, roles: list[str]) -> dict[str, Any]:
    return _with_facts(call({"sql": sql}, roles, "database", "query"))


def _reason(policy: CompiledPolicy, inp: dict[str, Any]) -> str:
    defined, value = _decide(policy, inp)
    d = check_decision(value, defined=defined)
    return "allowed" if d.allow else str(d.reason)


# Each of these reads employees (or its salaries) for an analyst, who may read orders, products
# and customers only.
EMPLOYEE_READS = [
    "SELECT * FROM employees",
    'select * from orders "o", employees',
    "select * from orders as \"o\" , employees e",
    "select * from orders not indexed, employees",
    "select * from orders o natural join employees",
    "select * from orders cross join employees",
    "select * from orders left join employees on 1=1",
    'select * from "employees"',
    "select * from 'employees'",
    "select * from EMPLOYEES",
    "select * from EmPlOyEeS",
    "select (select group_concat(salary) from employees)",
    "select * from orders where id in (select id from employees)",
    "select * from orders where exists (select 1 from employees where salary > 0)",
    "select count(*) from orders group by id having max((select max(salary) from employees)) > 0",
    "select 1 where 1 in employees",
    "with e as (select * from employees) select * from e",
    "with orders as (select * from employees) select * from orders",
    "select * from (with employees as (select 1) select * from employees) a, employees",
    "with a as (select * from b), b as (select 1) select * from a, employees",
    "select id from orders union select salary from employees",
    "select id from orders union all select id from (select * from employees)",
    "select * from orders /* , */ , employees",
    "select * from orders -- x\n, employees",
    "select * from\torders,\nemployees",
    "select * from customers c join (employees) e on 1=1",
]


@pytest.mark.parametrize("sql", EMPLOYEE_READS)
def test_analyst_cannot_read_employees_by_any_spelling(policy: CompiledPolicy, sql: str) -> None:
    """Whatever the spelling, a query reading employees is refused to an analyst (finding 1)."""
    assert _reason(policy, _query(sql, ["analyst"])) == "table_not_allowed"


@pytest.mark.parametrize("sql", [
    "select * from [employees]", "select * from `employees`", 'select * from "EMPLOYEES"',
    "select * from orders indexed by idx, employees", "table employees",
    "select * from orders; select * from employees", "attach 'x.db' as x", "pragma table_info(employees)",
    "select * into t from orders", "select * from orders for update",
    "with x as (delete from orders returning *) select * from x", "select * from orders\u00a0, employees",
    "select * from orders\u200b, employees", "", "   ", 42, None, ["select 1"],
])
def test_sql_not_understood_is_refused(policy: CompiledPolicy, sql: Any) -> None:
    """What either dialect cannot parse as one read-only query is refused, for admins too."""
    assert _reason(policy, _query(sql, ["admin"])) == "sql_not_understood"


@pytest.mark.parametrize("sql", [
    "select main.employees.salary from main.employees", "select * from temp.orders",
    "select * from main.orders", "select * from pg_catalog.pg_authid",
])
def test_qualified_tables_refused(policy: CompiledPolicy, sql: str) -> None:
    """A schema-qualified name is never taken for the bare table: refused, admins included."""
    assert _reason(policy, _query(sql, ["admin"])) == "table_not_allowed"


@pytest.mark.parametrize("sql", [
    "select fts3_tokenizer('simple')", "select load_extension('/tmp/x.so')", "select sqlite_version()",
    "select * from pragma_table_info('orders')", "select * from json_each('[1]')",
    "select readfile('/etc/passwd')", "select pg_read_file('/etc/passwd')", 'select "load_extension"(1)',
    "select * from orders where id = (select zeroblob(10))",
    "select query_to_xml('select 1', true, true, '')",
    "select current_user",
])
def test_functions_outside_the_allowlist_refused(policy: CompiledPolicy, sql: str) -> None:
    """Functions are allowlisted: anything not listed is refused, for admins too."""
    assert _reason(policy, _query(sql, ["admin"])) == "function_not_allowed"


@pytest.mark.parametrize(("sql", "roles"), [
    ("SELECT id, total FROM orders WHERE total > 10", ["analyst"]),
    ("select o.id, c.name from orders o join customers c on o.customer_id = c.id", ["analyst"]),
    ("select count(*), sum(total), round(avg(total), 2) from orders group by customer_id", ["analyst"]),
    ("with big as (select * from orders where total > ?) select count(*) from big", ["analyst"]),
    ("select upper(name), substr(name, 1, 3) from products where name like 'a%'", ["analyst"]),
    ("select strftime('%Y', created_at), coalesce(null, 1) from customers", ["analyst"]),
    ("select 1", ["analyst"]),
    ("values (1), (2)", ["engineer"]),
    ("select * from employees", ["admin"]),
    ("select * from inventory", ["engineer"]),
])
def test_allowed_queries_still_work(policy: CompiledPolicy, sql: str, roles: list[str]) -> None:
    """Ordinary reports over allowed tables with allowlisted functions are allowed."""
    assert _reason(policy, _query(sql, roles)) == "allowed"


def test_function_allowlist_is_one_list() -> None:
    """data.json's sql_functions is the list the parser module and the database server use."""
    import json

    from gateway.policy.sql import SQL_FUNCTIONS

    data = json.loads((POLICIES / "data.json").read_text(encoding="utf-8"))
    listed = data["gateway"]["sql_functions"]
    assert listed == sorted(set(listed))
    assert set(listed) == SQL_FUNCTIONS
    assert not {f for f in listed if f.startswith(("sqlite_", "pg_")) or "load" in f or "tokenizer" in f}


@pytest.mark.parametrize("roles", [["viewer"], ["analyst"], ["engineer"], ["admin"]])
@pytest.mark.parametrize("table", ["orders", "products", "customers", "employees", "inventory", "main.orders",
                                   "ORDERS", "%65mployees", "orders/../employees", ""])
def test_schema_resource_matches_describe_table(policy: CompiledPolicy, table: str, roles: list[str]) -> None:
    """resources/read db://schema/<t> is never allowed where describe_table of <t> is refused, and
    for a role granted the database's resources it is allowed exactly where describe_table is."""
    described = _reason(policy, _with_facts(call({"table": table}, roles, "database", "describe_table")))
    inp = {"mcp": {"kind": "request", "method": "resources/read", "resource_uri": f"db://schema/{table}"},
           "token": {"sub": "a", "roles": roles, "scope": "", "tenant": "acme"},
           "server": {"name": "database"}}
    read = _reason(policy, _with_facts(inp))
    if roles == ["viewer"]:  # no database resources at all
        assert read == "resource_not_allowed"
    else:
        assert (read == "allowed") == (described == "allowed"), (described, read)
        assert read in ("allowed", "table_not_allowed")


# ---------------------------------------------------------------- one decoding (issue 13, findings 3 and 5)

# Spellings of a path in a resource URI: the files server reads exactly the canonical ones
# (gateway.paths.file_uri_path), the gateway's facts judge exactly those, and every other spelling
# of tenants/globex must be refused, whatever the role.
GLOBEX_SPELLINGS = [
    "file:///%74enants/globex/reports/a", "file:///tenants%2Fglobex/reports/a", "file:///tenants%2fglobex/a",
    "file:///tenants/%67lobex/reports/a", "file:///shared/%2e%2e/tenants/globex/a", "file:///shared/%2E%2E/tenants/globex/a",
    "file:///%252e%252e/tenants/globex/a", "file:///%2574enants/globex/a", "file:///shared%5C..%5Ctenants%5Cglobex",
    "file:///%c0%ae%c0%ae/tenants/globex/a", "FILE:///tenants/globex/a", "file:/tenants/globex/a",
    "file://tenants/globex/a", "file://localhost/tenants/globex/a", "file:////tenants/globex/a",
    "file:///tenants//globex/a", "file:///tenants/./globex/a", "file:///./tenants/globex/a",
    "file:///tenants/globex/a?x", "file:///shared/a#/../../tenants/globex/a", "file:///tenants/glob\u0435x/a",
    "file:///tenants/globex/a%00", "file:///tenants/globex/reports/a",
]
RESOURCE_URIS = [
    *GLOBEX_SPELLINGS, "file:///shared/a.txt", "file:///shared/a%20b.txt", "file:///shared/caf%C3%A9",
    "file:///shared/caf%c3%a9", "file:///%73hared/a.txt", "file:///tenants/acme/reports/x",
    "file:///tenants/%61cme/reports/x", "file:///reports/q3", "file:///secret/a", "file:///", "file:///shared/",
    "file:///shared//a", "file:///shared/~x", "file:///shared/a.", "db://schema/orders", "ftp:/bad", "", 5,
    None,
]
RESOURCE_METHODS = ["resources/read", "resources/subscribe", "resources/unsubscribe"]


def resource_request(uri: Any, roles: list[str], method: str = "resources/read") -> dict[str, Any]:
    return {"mcp": {"kind": "request", "method": method, "name": uri, "resource_uri": uri, "arguments": {}},
            "token": {"sub": "a", "roles": roles, "scope": "", "tenant": "acme"}, "server": {"name": "files"}}


@pytest.mark.parametrize("uri", GLOBEX_SPELLINGS)
@pytest.mark.parametrize("roles", [["admin"], ["analyst"], ["engineer"], ["viewer"]])
@pytest.mark.parametrize("method", RESOURCE_METHODS)
def test_no_spelling_of_another_tenant_passes(policy: CompiledPolicy, uri: str, roles: list[str],
                                              method: str) -> None:
    """Every encoded, doubled, dotted or decorated spelling of tenants/globex is refused for acme,
    with the gateway's facts and without them, for read, subscribe and unsubscribe alike."""
    inp = resource_request(uri, roles, method)
    for doc in (inp, _with_facts(inp)):
        defined, value = _decide(policy, doc)
        d = check_decision(value, defined=defined)
        assert not d.allow, (uri, roles, method)
        if roles == ["admin"]:
            assert d.reason in ("path_invalid", "path_other_tenant"), d.reason


@pytest.mark.parametrize("method", RESOURCE_METHODS)
def test_rego_fallback_is_never_more_permissive_than_the_facts(policy: CompiledPolicy, method: str) -> None:
    """Without facts (the Rego's own uri_path) a URI is allowed only where the gateway's facts allow
    it; for URIs without escapes both give the same decision."""
    allowed = 0
    for uri in RESOURCE_URIS:
        for roles in ROLE_SETS:
            inp = resource_request(uri, roles, method)
            plain = _decide(policy, inp)
            with_facts = _decide(policy, _with_facts(inp))
            if plain[1]["allow"]:
                assert with_facts[1]["allow"], (uri, roles)
            if not (isinstance(uri, str) and "%" in uri):
                assert with_facts == plain, (uri, roles)
            allowed += with_facts[1]["allow"]
    assert allowed > 10


def test_escaped_names_are_judged_decoded(policy: CompiledPolicy) -> None:
    """A canonical escape (a space, an accent) is read as the server reads it: shared/ stays shared/."""
    for uri in ("file:///shared/a%20b.txt", "file:///shared/caf%C3%A9"):
        defined, value = _decide(policy, _with_facts(resource_request(uri, ["viewer"])))
        assert check_decision(value, defined=defined).allow, uri


def _visible(policy: CompiledPolicy, items: list[Any], roles: list[str]) -> set[str]:
    compiled = CompiledPolicy(load_sources(POLICIES, include_tests=False), ["mcp/authz/visible_resources"])
    inp = {"mcp": {"kind": "request", "method": "resources/list"}, "kind": "resources", "items": items,
           "token": {"sub": "a", "roles": roles, "scope": "", "tenant": "acme"}, "server": {"name": "files"}}
    defined, value = compiled.evaluate("mcp/authz/visible_resources", inp)
    return set(value) if defined else set()


@pytest.mark.parametrize("roles", [["viewer"], ["analyst"], ["engineer"], ["admin"]])
def test_list_filtering_shows_only_what_a_read_allows(policy: CompiledPolicy, roles: list[str]) -> None:
    """A files resource is listed only if resources/read of it (with the gateway's facts) is allowed:
    list filtering is no side door, whatever the spelling of the listed URI."""
    items = [u for u in RESOURCE_URIS if isinstance(u, str)]
    shown = _visible(policy, items, roles)
    for uri in shown:
        defined, value = _decide(policy, _with_facts(resource_request(uri, roles)))
        assert check_decision(value, defined=defined).allow, uri
    assert not shown & set(GLOBEX_SPELLINGS)


def test_completion_is_refused_on_the_files_server(policy: CompiledPolicy) -> None:
    """completion/complete would list paths by another door: refused on files, open elsewhere."""
    for server, allowed in (("files", False), ("conformance", True)):
        inp = {"mcp": {"kind": "request", "method": "completion/complete", "arguments": {}},
               "token": {"sub": "a", "roles": ["admin"], "scope": "", "tenant": "acme"},
               "server": {"name": server}}
        defined, value = _decide(policy, inp)
        d = check_decision(value, defined=defined)
        assert d.allow is allowed, server
        if not allowed:
            assert d.reason == "method_not_allowed"


@pytest.mark.parametrize("depth", [1, 5, 6, 7, 8, 9, 40, 124])
def test_deep_paths_decide_alike_with_and_without_facts(policy: CompiledPolicy, depth: int) -> None:
    """Prefixes are listed to MAX_PREFIX_DEPTH only, in Python and Rego alike: deep paths keep
    their decisions (allowed under shared/, refused elsewhere)."""
    for top in ("shared", "secret", "tenants/acme/reports", "tenants/globex/reports"):
        path = top + "/d" * depth
        for roles in (["viewer"], ["analyst"], ["admin"]):
            inp = call({"path": path}, roles)
            assert _decide(policy, _with_facts(inp)) == _decide(policy, inp), (path, roles)
