"""SQL facts from a real parser: the tables a query reads and the functions it calls, however the
text is spelled, refusing what either dialect cannot parse, bounded before work grows."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import sqlglot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from gateway.errors import InputLimitExceeded
from gateway.policy import sql as sqlmod
from gateway.policy.facts import mcp_facts
from gateway.policy.sql import (
    MAX_SQL_LENGTH,
    MAX_SQL_NESTING,
    MAX_SQL_TOKENS,
    MAX_TABLE_REFERENCES,
    SQL_FUNCTIONS,
    analyze,
    sql_facts,
)


def tables(sql: str) -> set[str]:
    facts = analyze(sql)
    assert facts.understood, facts.problem
    return set(facts.tables)


def functions(sql: str) -> set[str]:
    facts = analyze(sql)
    assert facts.understood, facts.problem
    return set(facts.functions)


# Every one of these reads employees; the set of tables must say so.
READS_EMPLOYEES = [
    "SELECT * FROM employees",
    "select * from orders o, employees",
    'select * from orders "o", employees',
    'select * from orders as "o" , employees e',
    "select * from orders 'o', employees",
    "select * from orders not indexed, employees",
    "select * from orders o natural join employees",
    "select * from orders cross join employees",
    "select * from orders inner join employees using (id)",
    "select * from orders left outer join employees on 1 = 1",
    "select * from orders join employees",
    "select * from (orders), (employees)",
    "select * from ((employees))",
    'select * from "employees"',
    "select * from 'employees'",
    "select * from EMPLOYEES",
    "select * from eMpLoYeEs",
    "select (select group_concat(salary_cents) from employees)",
    "select * from orders where id in (select id from employees)",
    "select * from orders where exists (select 1 from employees)",
    "select * from orders where id = (select max(id) from employees)",
    "select count(*) from orders group by id having max((select 1 from employees)) > 0",
    "select * from orders order by (select 1 from employees)",
    "select * from orders limit (select count(*) from employees)",
    "select case when 1 then (select name from employees) end",
    "select 1 where 1 in employees",
    "with e as (select * from employees) select * from e",
    "with orders as (select * from employees) select * from orders",
    "with employees as (select * from employees) select * from employees",
    "select * from (with employees as (select 1) select * from employees) a, employees",
    "with a as (select * from b), b as (select * from employees) select * from a",
    "select id from orders union select id from employees",
    "select id from orders intersect select id from employees",
    "select id from orders except select id from employees",
    "select id from orders union all select id from (select * from employees)",
    "select * from orders /* , */ , employees",
    "select * from orders -- comment\n, employees",
    "select * from\torders,\r\nemployees",
    "SELECT * FROM orders , employees ;",
    "select * from only employees",
    "values ((select name from employees))",
    "select * from orders o(a), employees",
]


@pytest.mark.parametrize("sql", READS_EMPLOYEES)
def test_tables_include_employees_however_spelled(sql: str) -> None:
    """Joins of every spelling, quoted names, subqueries anywhere, CTE bodies, set operations:
    the table read is in the facts."""
    assert "employees" in tables(sql)


def test_cte_names_are_not_tables_but_their_bodies_are() -> None:
    """A CTE reference is not a table; a CTE shadowing a table name hides only that table."""
    assert tables("with e as (select * from orders) select * from e") == {"orders"}
    assert tables("with orders as (select * from products) select * from orders") == {"products"}
    assert tables("with recursive c(n) as (select 1 union all select n + 1 from c where n < 5) "
                  "select * from c") == set()
    assert tables("with a as (select 1), b as (select * from a) select * from b") == set()


def test_qualified_names_stay_distinguishable() -> None:
    """main.employees, temp.x and pg_catalog.y are kept qualified, never taken for the bare name."""
    assert tables("select * from main.employees") == {"main.employees"}
    assert tables("select * from temp.orders, main.orders") == {"temp.orders", "main.orders"}
    assert tables('select * from "main"."employees"') == {"main.employees"}
    assert tables("select * from pg_catalog.pg_authid") == {"pg_catalog.pg_authid"}
    assert tables("select 1 where 1 in main.employees") == {"main.employees"}
    assert tables("with main as (select 1) select * from main.orders") == {"main.orders"}


def test_catalogue_tables_are_tables() -> None:
    """sqlite_master / sqlite_schema / information_schema reads are reported like any table."""
    assert tables("select * from sqlite_master") == {"sqlite_master"}
    assert tables("select * from sqlite_schema") == {"sqlite_schema"}
    assert tables("select * from information_schema.tables") == {"information_schema.tables"}


@pytest.mark.parametrize("sql", [
    "select * from [employees]",  # SQLite brackets: not PostgreSQL
    "select * from `employees`",  # backticks: not PostgreSQL
    'select * from "EMPLOYEES"',  # quoted upper case: a different table in PostgreSQL
    'select * from "Employees"',
    'select * from "employees.x"',
    'select * from "empl\u00f6yees"',
    "select * from empl\u00f6yees",
    "select * from orders indexed by ix, employees",
    "table employees",
    "select * from orders; select * from employees",
    "select 1; select 2",
    "attach database '/tmp/x.db' as x",
    "detach database x",
    "pragma table_info(employees)",
    "pragma query_only = off",
    "delete from orders",
    "insert into orders select * from orders",
    "update orders set id = 1",
    "drop table orders",
    "create table x (a)",
    "with x as (select 1) delete from orders",
    "with x as (delete from orders returning *) select * from x",
    "select * into t from orders",
    "select * from orders for update",
    "vacuum",
    "explain select 1",
    "begin",
    "select * from orders\u00a0, employees",
    "select * from orders\u200b, employees",
    "select * from orders\ufeff, employees",
    "select * from orders\u2028, employees",
    "select * from orders\x0b, employees",
    "select * from orders\x0c, employees",
    "select 1\x00",
    "selec 1",
    "",
    "   ",
    "/* only a comment */",
    "select * from orders where",
    "select * from departments join lateral employees on true",  # SQLite: table "lateral"
    "select * from orders, lateral employees",
    "select * from lateral",
])
def test_what_either_dialect_cannot_parse_is_not_understood(sql: str) -> None:
    """Anything but one read-only query both dialects parse is not understood (and lists nothing)."""
    facts = analyze(sql)
    assert facts.understood is False and facts.problem
    assert facts.as_input() == {"understood": False, "tables": [], "functions": []}


@pytest.mark.parametrize("value", [None, 42, ["select 1"], {"sql": "select 1"}, b"select 1"])
def test_non_string_sql_is_not_understood(value: Any) -> None:
    """A non-string sql argument gets facts that refuse it."""
    assert sql_facts(value) == {"understood": False, "tables": [], "functions": []}


@pytest.mark.parametrize(("sql", "expected"), [
    ("select fts3_tokenizer('simple')", {"fts3_tokenizer"}),
    ("select load_extension('/tmp/x.so')", {"load_extension"}),
    ('select "load_extension"(1)', {"load_extension"}),
    ("select LOAD_EXTENSION(1)", {"load_extension"}),
    ("select sqlite_version()", {"sqlite_version"}),
    ("select * from pragma_table_info('employees')", {"pragma_table_info"}),
    ("select * from json_each('[1]')", {"json_each"}),
    ("select * from orders, json_tree('{}')", {"json_tree"}),
    ("select 1 where 1 in (select readfile('/etc/passwd'))", {"readfile"}),
    ("select pg_read_file('/etc/passwd')", {"pg_read_file"}),
    ("select substr(a, 1, 2), SUBSTRING(a, 1), count(*), ifnull(a, b) from t",
     {"substr", "substring", "count", "ifnull"}),
    ("select cast(a as int), trim(a), char(65), current_date, current_timestamp from t",
     {"cast", "trim", "char", "current_date", "current_timestamp"}),
    ("select strftime('%Y', a), iif(a, b, c), group_concat(a) from t", {"strftime", "iif", "group_concat"}),
    ("select a from t where a like 'x%' and b between 1 and 2 and exists (select 1)", set()),
    ("select case when a then b end, a || b, -a, not a from t", set()),
    ("select row_number() over (order by a), sum(a) filter (where a > 0) from t", {"row_number", "sum"}),
    ("select current_user", {"current_user"}),
])
def test_functions_are_reported_as_written(sql: str, expected: set[str]) -> None:
    """Every called function is reported under the name the engine will call (lower-case);
    operators and keywords are not functions."""
    assert functions(sql) == expected


def test_allowlist_is_conservative() -> None:
    """Nothing in the allowlist loads code, reads files, returns pointers or reveals the engine."""
    assert not {f for f in SQL_FUNCTIONS if f.startswith(("sqlite_", "pg_", "load", "read", "json", "fts"))}
    assert {"count", "sum", "substr", "like", "glob", "strftime"} <= SQL_FUNCTIONS
    assert all(f == f.lower() for f in SQL_FUNCTIONS)


# -- bounds ----------------------------------------------------------------------------------------


def _limit_of(sql: str) -> dict[str, Any]:
    with pytest.raises(InputLimitExceeded) as info:
        analyze(sql)
    err = info.value
    assert err.http_status == 400 and err.to_rpc_error()["data"]["reason"] == "input_limit_exceeded"
    assert isinstance(err.data, dict)
    return err.data


@pytest.mark.parametrize("size", [MAX_SQL_LENGTH + 1, 2 * MAX_SQL_LENGTH, 1_000_000])
def test_length_cap_before_parsing(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text over the length cap is refused before the tokenizer sees it, naming the bound."""
    def no_parse(*_: Any) -> None:
        raise AssertionError("parsed text over the cap")

    monkeypatch.setattr(sqlmod, "_analyze", no_parse)
    sql = "select 1 from orders" + " " * (size - 20)
    assert _limit_of(sql) == {"limit": "sql_length", "max": MAX_SQL_LENGTH}


@pytest.mark.parametrize("sql", [
    "select 1" + ",1" * MAX_SQL_TOKENS,
    "select 1" + "+1" * MAX_SQL_TOKENS,
    "select * from a" + " join a on 1" * (MAX_SQL_TOKENS // 4),
    "select 1 where 1 in (1" + ",1" * MAX_SQL_TOKENS + ")",
])
def test_token_cap(sql: str) -> None:
    """Text within the length cap but over the token cap is refused before parsing."""
    assert len(sql) <= MAX_SQL_LENGTH
    assert _limit_of(sql) == {"limit": "sql_tokens", "max": MAX_SQL_TOKENS}


@pytest.mark.parametrize("sql", [
    "select " + "(" * (MAX_SQL_NESTING + 1) + "1" + ")" * (MAX_SQL_NESTING + 1),
    "select " + "(" * 5000,
    "select '" + "(" * (MAX_SQL_NESTING + 1) + "'",
    "select " + "[" * (MAX_SQL_NESTING + 1),
])
def test_bracket_nesting_cap(sql: str) -> None:
    """Deep brackets are refused before the (recursive) parser runs."""
    assert _limit_of(sql) == {"limit": "sql_nesting", "max": MAX_SQL_NESTING}


@pytest.mark.parametrize("sql", [
    "select " + "not " * 900 + "1",
    "select " + "- " * 900 + "1",
    "select " + "case when 1 then " * 300 + "1" + " end" * 300,
])
def test_nesting_without_brackets_is_refused_not_crashed(sql: str) -> None:
    """Expressions nested without brackets end in the same limit, not a RecursionError."""
    try:
        facts = analyze(sql)
    except InputLimitExceeded as err:
        assert isinstance(err.data, dict) and err.data["limit"] in ("sql_nesting", "sql_tokens")
    else:
        assert facts.understood in (True, False)


def test_table_reference_cap() -> None:
    """More table references than the cap are refused, naming the bound."""
    ok = "select * from " + ", ".join(["orders"] * MAX_TABLE_REFERENCES)  # noqa: S608 (test text)
    assert tables(ok) == {"orders"}
    over = "select * from " + ", ".join(["orders"] * (MAX_TABLE_REFERENCES + 1))  # noqa: S608
    assert _limit_of(over) == {"limit": "sql_table_references", "max": MAX_TABLE_REFERENCES}


def test_worst_inputs_under_the_caps_finish() -> None:
    """The largest texts of each costly shape under the caps are analysed (timings: README)."""
    shapes = [("select 1", ",abs(1)"), ("select 1", "+" + "(" * 30 + "1" + ")" * 30),
              ("select 1", " union select 1"), ("select case", " when 1 then 1")]
    for prefix, unit in shapes:
        sql = prefix
        while True:
            longer = sql + unit
            rough_tokens = longer.count(" ") + longer.count("(") * 2
            if len(longer) > MAX_SQL_LENGTH or rough_tokens > MAX_SQL_TOKENS // 2:
                break
            sql = longer
        suffix = " end" if "case" in prefix else ""
        try:
            analyze(sql + suffix)
        except InputLimitExceeded as err:
            assert isinstance(err.data, dict) and err.data["limit"] != "sql_length"


def test_mcp_facts_carry_sql_facts() -> None:
    """A tool call with an sql argument gets input.mcp.facts.sql from this module."""
    facts = mcp_facts({"arguments": {"sql": "select * from orders o, employees"}})
    assert facts["sql"] == {"understood": True, "tables": ["employees", "orders"], "functions": []}
    assert mcp_facts({"arguments": {"sql": 5}})["sql"]["understood"] is False


def test_mcp_facts_raise_the_limit_for_oversized_sql() -> None:
    """An oversized sql argument stops building the policy input with InputLimitExceeded."""
    with pytest.raises(InputLimitExceeded):
        mcp_facts({"arguments": {"sql": "select 1" + " " * MAX_SQL_LENGTH}})


# -- the parse against the engine (property tests) -------------------------------------------------

_TABLES = ["orders", "products", "customers", "employees"]


@st.composite
def _table_ref(draw: st.DrawFn, depth: int = 0) -> str:
    name = draw(st.sampled_from(_TABLES))
    spelled = draw(st.sampled_from([name, name.upper(), f'"{name}"', f"'{name}'", f"main.{name}",
                                    f"[{name}]", f"`{name}`"]))
    if depth < 2 and draw(st.booleans()):
        spelled = f"({draw(_select(depth + 1))})"
    alias = draw(st.sampled_from(["", " t", ' "T"', " AS x", " 'a'", " NOT INDEXED"]))
    if spelled.startswith("(") and alias == " NOT INDEXED":
        alias = " s"
    return spelled + alias


@st.composite
def _select(draw: st.DrawFn, depth: int = 0) -> str:
    refs = draw(st.lists(_table_ref(depth), min_size=1, max_size=3))
    joiners = [draw(st.sampled_from([", ", " JOIN ", " CROSS JOIN ", " NATURAL JOIN ", " LEFT JOIN "]))
               for _ in refs[1:]]
    source = refs[0] + "".join(j + r + (" ON 1" if j in (" JOIN ", " LEFT JOIN ") else "")
                               for j, r in zip(joiners, refs[1:], strict=True))
    column = "1"
    if depth < 2 and draw(st.booleans()):
        column = f"(SELECT 1 FROM {draw(_table_ref(depth + 1))} LIMIT 1)"  # noqa: S608 (generated SQL)
    where = ""
    if depth < 2 and draw(st.booleans()):
        where = draw(st.sampled_from([" WHERE 1 IN (SELECT 1 FROM {t})", " WHERE EXISTS (SELECT 1 FROM {t})",
                                      " WHERE 1 IN {n}"])).format(t=draw(_table_ref(depth + 1)),
                                                                  n=draw(st.sampled_from(_TABLES)))
    query = f"SELECT {column} FROM {source}{where}"  # noqa: S608 (generated SQL)
    if depth == 0 and draw(st.booleans()):
        cte = draw(st.sampled_from(_TABLES + ["c"]))
        query = f"WITH {cte} AS (SELECT * FROM {draw(_table_ref(1))}) {query}"  # noqa: S608
    return query


def _engine_reads(sql: str, db: str) -> set[tuple[str, str | None]] | None:
    """The (table, database) reads SQLite makes for ``sql`` (None when SQLite refuses it)."""
    reads: set[tuple[str, str | None]] = set()

    def authorize(action: int, arg1: str | None, _arg2: str | None, database: str | None, *_: Any) -> int:
        if action == sqlite3.SQLITE_READ and arg1:
            reads.add((arg1.lower(), database))
        return sqlite3.SQLITE_OK

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        conn.set_authorizer(authorize)
        try:
            conn.execute(sql).fetchmany(1)
        except sqlite3.Error:
            return None
    finally:
        conn.close()
    return reads


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mcp_servers.database.seed import seed_sqlite

    path = str(tmp_path_factory.mktemp("sqlfacts") / "demo.sqlite3")
    seed_sqlite(path)
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sql=_select())
def test_parsed_tables_cover_what_sqlite_reads(demo_db: str, sql: str) -> None:
    """For generated queries of many spellings, every table SQLite reads is in the parsed facts
    (qualified as main.x or bare), or the text is refused as not understood."""
    facts = analyze(sql)
    reads = _engine_reads(sql, demo_db)
    if not facts.understood or reads is None:
        return
    bare = {t.rsplit(".", 1)[-1] for t in facts.tables}
    # SQLite also reports a materialized CTE as a column-less read without a database name
    # (which the database server's authorizer refuses: a false refusal, never a widening).
    ctes = {cte.alias_or_name.lower() for cte in sqlglot.parse_one(sql, read="sqlite").find_all(exp.CTE)}
    for table, database in reads:
        assert table in bare or (database is None and table in ctes), (sql, reads, facts.tables)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from([*"selctfromwhin(),'\"`[]-/*; \n\tabEXS1.", "\u00a0", "\x00"]),
                    max_size=80))
def test_arbitrary_text_never_breaks_the_parser(text: str) -> None:
    """Any text gives facts or a named limit, never another exception."""
    try:
        facts = analyze(text)
    except InputLimitExceeded:
        return
    assert facts.understood or facts.tables == frozenset()
