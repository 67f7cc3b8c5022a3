# Unit tests of authz.rego. Run them with `mcp-gateway policy test` (or `opa test policies/`).
package mcp.authz_test

import rego.v1

import data.mcp.authz

token(roles, scope) := {"sub": "alice", "roles": roles, "scope": scope, "tenant": "acme"}

call(server, tool, args, roles, scope) := {
	"mcp": {"kind": "request", "method": "tools/call", "name": tool, "tool": tool, "arguments": args},
	"token": token(roles, scope),
	"server": {"name": server},
}

files(tool, args, roles) := call("files", tool, args, roles, "tools:call:files/*")

db(tool, args, roles) := call("database", tool, args, roles, "tools:call:database/*")

rpc(method, roles) := {
	"mcp": {"kind": "request", "method": method},
	"token": token(roles, ""),
	"server": {"name": "files"},
}

# Two rego-cpp 1.5.2 quirks shape this helper (see README.md): `with input as x` fails to
# compile, so each top-level field is replaced on its own; and a value built by function calls
# is mis-evaluated under `with` unless it is first normalized by a JSON round trip.
decide(raw) := d if {
	inp := json.unmarshal(json.marshal(raw))
	d := authz.decision with input.mcp as object.get(inp, "mcp", null)
		with input.token as object.get(inp, "token", null)
		with input.server as object.get(inp, "server", null)
		with input.session as object.get(inp, "session", null)
}

denied_with(inp, reason) if {
	d := decide(inp)
	d.allow == false
	d.reason == reason
	d.http_status == 403
}

allowed(inp) if {
	d := decide(inp)
	d.allow == true
}

# ---------------------------------------------------------------- non-tool methods

test_open_methods_allowed_for_any_role if {
	allowed(rpc("initialize", ["viewer"]))
	allowed(rpc("tools/list", ["analyst"]))
	allowed(rpc("ping", ["conformance"]))
	allowed(rpc("notifications/initialized", ["viewer"]))
}

test_no_known_role_is_denied if {
	denied_with(rpc("tools/list", []), "no_role")
	denied_with(rpc("tools/list", ["intern"]), "no_role")
}

test_unknown_method_denied if {
	denied_with(rpc("sampling/createMessage", ["admin"]), "method_not_allowed")
}

test_unknown_server_denied if {
	inp := object.union(rpc("tools/list", ["admin"]), {"server": {"name": "payroll"}})
	denied_with(inp, "unknown_server")
}

test_missing_token_denied if {
	d := decide({"mcp": {"method": "tools/list"}, "server": {"name": "files"}})
	d.allow == false
}

# ---------------------------------------------------------------- RBAC and scopes

test_rbac_allows_role_tool if {
	allowed(files("read_file", {"path": "shared/a.txt"}, ["viewer"]))
}

test_rbac_denies_tool_outside_role if {
	denied_with(files("write_file", {"path": "shared/a.txt"}, ["viewer"]), "tool_not_allowed")
	denied_with(files("search", {"path": "shared"}, ["viewer"]), "tool_not_allowed")
}

test_missing_scope_named if {
	inp := call("files", "read_file", {"path": "shared/a.txt"}, ["viewer"], "tools:call:database/*")
	d := decide(inp)
	d.allow == false
	d.reason == "insufficient_scope"
	d.missing_scope == "tools:call:files/read_file"
}

test_exact_scope_suffices if {
	allowed(call("files", "read_file", {"path": "shared/a.txt"}, ["viewer"], "openid tools:call:files/read_file"))
}

test_scope_does_not_widen_role if {
	inp := call("files", "write_file", {"path": "shared/a"}, ["viewer"], "tools:call:files/write_file")
	denied_with(inp, "tool_not_allowed")
}

test_conformance_role_and_scope if {
	allowed(call("conformance", "test_simple_text", {}, ["conformance"], "tools:call:conformance/*"))
	denied_with(call("conformance", "test_simple_text", {}, ["viewer"], "tools:call:conformance/*"), "tool_not_allowed")
	denied_with(call("files", "read_file", {"path": "shared/a"}, ["conformance"], "tools:call:files/*"), "tool_not_allowed")
}

# ---------------------------------------------------------------- file paths

test_path_prefix_by_role if {
	allowed(files("read_file", {"path": "reports/q3.txt"}, ["analyst"]))
	denied_with(files("read_file", {"path": "projects/x.py"}, ["analyst"]), "path_not_allowed")
	allowed(files("read_file", {"path": "projects/x.py"}, ["engineer"]))
}

test_path_prefix_is_segment_based if {
	denied_with(files("read_file", {"path": "shared-secrets/a"}, ["viewer"]), "path_not_allowed")
	allowed(files("read_file", {"path": "./shared//a"}, ["viewer"]))
}

test_path_traversal_denied if {
	denied_with(files("read_file", {"path": "shared/../secret"}, ["admin"]), "path_invalid")
	denied_with(files("read_file", {"path": "/etc/passwd"}, ["admin"]), "path_invalid")
}

# Backslashes and non-string paths are covered by tests/policies/test_authz_policy.py: rego-cpp
# 1.5.2 fails on them inside the JSON round trip that decide() needs.

test_missing_path_means_root if {
	denied_with(files("list_directory", {}, ["viewer"]), "path_not_allowed")
	allowed(files("list_directory", {}, ["admin"]))
}

test_write_needs_write_prefix if {
	allowed(files("write_file", {"path": "projects/a.txt", "content": "x"}, ["engineer"]))
	denied_with(files("write_file", {"path": "shared/a.txt", "content": "x"}, ["engineer"]), "path_not_allowed")
}

# delete_file is judged as a write: a write prefix, the caller's own tenant, a well-formed path.
test_delete_needs_write_prefix if {
	allowed(files("delete_file", {"path": "projects/invoices/order-1.json"}, ["engineer"]))
	allowed(files("delete_file", {"path": "tenants/acme/scratch/a.txt"}, ["engineer"]))
	denied_with(files("delete_file", {"path": "shared/a.txt"}, ["engineer"]), "path_not_allowed")
	denied_with(files("delete_file", {"path": "tenants/globex/scratch/a.txt"}, ["engineer"]), "path_other_tenant")
	denied_with(files("delete_file", {"path": "projects/../shared/a.txt"}, ["engineer"]), "path_invalid")
	denied_with(files("delete_file", {}, ["engineer"]), "path_not_allowed")
	denied_with(files("delete_file", {"path": "shared/a.txt"}, ["analyst"]), "tool_not_allowed")
}

test_every_path_argument_checked if {
	denied_with(files("search", {"path": "shared", "root": "secret"}, ["analyst"]), "path_not_allowed")
}

# Each path argument is read by name (authz.rego, file_paths): every name is checked.
test_each_path_argument_name_checked if {
	some name in authz.path_argument_names
	denied_with(files("search", {name: "secret"}, ["analyst"]), "path_not_allowed")
	denied_with(files("search", {name: "tenants/globex/a"}, ["admin"]), "path_other_tenant")
	allowed(files("search", {name: "shared/a"}, ["analyst"]))
}

test_arguments_not_an_object_denied if {
	denied_with(files("list_directory", "shared", ["admin"]), "arguments_invalid")
	denied_with(files("list_directory", ["shared"], ["admin"]), "arguments_invalid")
	denied_with(files("list_directory", 7, ["admin"]), "arguments_invalid")
	denied_with(files("list_directory", true, ["admin"]), "arguments_invalid")
}

test_arguments_null_or_absent_mean_none if {
	allowed(files("list_directory", null, ["admin"]))
	inp := files("list_directory", {}, ["admin"])
	allowed(object.union(object.remove(inp, ["mcp"]), {"mcp": object.remove(inp.mcp, ["arguments"])}))
}

# The gateway passes the facts of each path (input.mcp.facts, README.md "Path facts"); the policy
# judges those instead of re-deriving them.
with_path_facts(inp, facts) := object.union(inp, {"mcp": object.union(inp.mcp, {"facts": {"arguments": facts}})})

test_gateway_path_facts_are_used if {
	inp := files("read_file", {"path": "shared/a.txt"}, ["viewer"])
	allowed(with_path_facts(inp, [{"well_formed": true, "prefixes": ["", "shared", "shared/a.txt"]}]))
	denied_with(with_path_facts(inp, [{"well_formed": false}]), "path_invalid")
	denied_with(with_path_facts(inp, [{"well_formed": true, "prefixes": ["", "secret"]}]), "path_not_allowed")
}

test_gateway_path_facts_tenant_folders if {
	inp := files("read_file", {"path": "tenants/acme/reports/a"}, ["analyst"])
	own := {"well_formed": true, "prefixes": ["", "tenants", "tenants/acme", "tenants/acme/reports", "tenants/acme/reports/a"], "tenant": "acme"}
	allowed(with_path_facts(inp, [own]))
	other := {"well_formed": true, "prefixes": ["", "tenants", "tenants/globex"], "tenant": "globex"}
	denied_with(with_path_facts(inp, [other]), "path_other_tenant")
	denied_with(with_path_facts(files("list_directory", {}, ["admin"]), [{"well_formed": true, "prefixes": [""], "tenant": ""}]), "path_other_tenant")
}

test_every_gateway_path_fact_must_pass if {
	inp := files("search", {"path": "shared", "root": "x"}, ["analyst"])
	ok := {"well_formed": true, "prefixes": ["", "shared"]}
	allowed(with_path_facts(inp, [ok, ok]))
	denied_with(with_path_facts(inp, [ok, {"well_formed": true, "prefixes": ["", "secret"]}]), "path_not_allowed")
}

# ---------------------------------------------------------------- tenant isolation

test_own_tenant_folder_allowed if {
	allowed(files("read_file", {"path": "tenants/acme/reports/a.csv"}, ["analyst"]))
}

test_other_tenant_folder_denied_even_for_admin if {
	denied_with(files("read_file", {"path": "tenants/globex/a.csv"}, ["admin"]), "path_other_tenant")
	denied_with(files("list_directory", {"path": "tenants"}, ["admin"]), "path_other_tenant")
}

test_tenant_claim_required_for_tools if {
	inp := files("read_file", {"path": "shared/a"}, ["viewer"])
	no_tenant := {"sub": "a", "roles": ["viewer"], "scope": "tools:call:files/*"}
	denied_with(object.union(object.remove(inp, ["token"]), {"token": no_tenant}), "tenant_required")
}

test_tenant_argument_must_match if {
	denied_with(db("list_tables", {"tenant": "globex"}, ["analyst"]), "tenant_mismatch")
	denied_with(db("list_tables", {"tenant_id": "globex"}, ["analyst"]), "tenant_mismatch")
	denied_with(db("list_tables", {"tenant": "acme", "tenant_id": "globex"}, ["analyst"]), "tenant_mismatch")
	allowed(db("list_tables", {"tenant": "acme"}, ["analyst"]))
	allowed(db("list_tables", {"tenant": "acme", "tenant_id": "acme"}, ["analyst"]))
}

test_session_never_crosses_tenants if {
	inp := object.union(rpc("tools/list", ["admin"]), {"session": {"tenant": "globex"}})
	denied_with(inp, "session_tenant_mismatch")
	allowed(object.union(rpc("tools/list", ["admin"]), {"session": {"tenant": "acme"}}))
}

# ---------------------------------------------------------------- database

# The gateway computes input.mcp.facts.sql from the text (gateway/policy/sql.py); the policy
# reads only those facts, so these tests give them directly. tests/gateway/policy/test_sql.py
# checks the parser against attacker spellings, tests/policies the two together.
sql_facts(tables, functions) := {"understood": true, "tables": tables, "functions": functions}

# (Built whole: rego-cpp's object.union does not merge nested objects.)
dbq(facts, roles) := {
	"mcp": {
		"kind": "request", "method": "tools/call", "name": "query", "tool": "query",
		"arguments": {"sql": "(the text the facts were computed from)"},
		"facts": {"sql": facts},
	},
	"token": token(roles, "tools:call:database/*"),
	"server": {"name": "database"},
}

test_tables_by_role if {
	allowed(dbq(sql_facts(["orders"], []), ["analyst"]))
	allowed(dbq(sql_facts(["customers", "orders"], ["count", "sum"]), ["analyst"]))
	allowed(dbq(sql_facts(["ORDERS"], []), ["analyst"]))
	allowed(dbq(sql_facts([], ["abs"]), ["analyst"]))
	allowed(dbq(sql_facts(["employees", "sqlite_master"], []), ["admin"]))
	denied_with(dbq(sql_facts(["customers"], []), ["engineer"]), "table_not_allowed")
	denied_with(dbq(sql_facts(["orders", "salaries"], []), ["analyst"]), "table_not_allowed")
	denied_with(dbq(sql_facts(["orders", "employees"], ["substr"]), ["analyst"]), "table_not_allowed")
}

# A qualified name is a different string from the bare one: refused unless listed as written,
# and "*" admits plain names only.
test_qualified_tables_denied if {
	denied_with(dbq(sql_facts(["main.orders"], []), ["analyst"]), "table_not_allowed")
	denied_with(dbq(sql_facts(["main.employees"], []), ["admin"]), "table_not_allowed")
	denied_with(dbq(sql_facts(["pg_catalog.pg_authid"], []), ["admin"]), "table_not_allowed")
}

test_functions_allowlisted if {
	denied_with(dbq(sql_facts(["orders"], ["fts3_tokenizer"]), ["admin"]), "function_not_allowed")
	denied_with(dbq(sql_facts([], ["load_extension"]), ["admin"]), "function_not_allowed")
	denied_with(dbq(sql_facts([], ["sqlite_version"]), ["admin"]), "function_not_allowed")
	denied_with(dbq(sql_facts([], ["pg_read_file"]), ["admin"]), "function_not_allowed")
	denied_with(dbq(sql_facts(["orders"], ["count", "readfile"]), ["analyst"]), "function_not_allowed")
	denied_with(dbq(sql_facts(["orders"], ["COUNT"]), ["analyst"]), "function_not_allowed")
	# Tables are judged first.
	denied_with(dbq(sql_facts(["employees"], ["load_extension"]), ["analyst"]), "table_not_allowed")
}

# Missing, partial or negative facts refuse the query, for every role.
test_unclear_sql_denied if {
	denied_with(db("query", {"sql": "SELECT * FROM orders"}, ["admin"]), "sql_not_understood")
	denied_with(db("query", {}, ["admin"]), "sql_not_understood")
	denied_with(dbq({"understood": false, "tables": [], "functions": []}, ["admin"]), "sql_not_understood")
	denied_with(dbq({"understood": true, "functions": []}, ["admin"]), "sql_not_understood")
	denied_with(dbq({"understood": true, "tables": ["orders"]}, ["admin"]), "sql_not_understood")
	denied_with(dbq({"understood": "true", "tables": [], "functions": []}, ["admin"]), "sql_not_understood")
	denied_with(dbq({"understood": true, "tables": "orders", "functions": []}, ["admin"]), "sql_not_understood")
	denied_with(dbq({}, ["admin"]), "sql_not_understood")
}

test_describe_table_by_role if {
	allowed(db("describe_table", {"table": "Products"}, ["viewer"]))
	denied_with(db("describe_table", {"table": "orders"}, ["viewer"]), "table_not_allowed")
}

# insert_row / delete_row: granted by role like any tool, and only on a table the role lists
# (the server itself writes only its --writable-table tables).
test_row_writes_by_role_and_table if {
	allowed(db("insert_row", {"table": "invoice_records", "values": {"order_id": 1}}, ["engineer"]))
	allowed(db("delete_row", {"table": "invoice_records", "id": 3}, ["engineer"]))
	allowed(db("delete_row", {"table": "invoice_records", "id": 3}, ["admin"]))
	denied_with(db("insert_row", {"table": "customers", "values": {}}, ["engineer"]), "table_not_allowed")
	denied_with(db("delete_row", {"table": "employees", "id": 1}, ["engineer"]), "table_not_allowed")
	denied_with(db("delete_row", {"id": 1}, ["engineer"]), "table_not_allowed")
	denied_with(db("insert_row", {"table": ["invoice_records"], "values": {}}, ["engineer"]), "table_not_allowed")
	denied_with(db("insert_row", {"table": "main.invoice_records", "values": {}}, ["admin"]), "table_not_allowed")
	denied_with(db("insert_row", {"table": "invoice_records", "values": {}}, ["analyst"]), "tool_not_allowed")
	denied_with(db("delete_row", {"table": "orders", "id": 1}, ["analyst"]), "tool_not_allowed")
}

schema_read(uri, roles) := {
	"mcp": {"kind": "request", "method": "resources/read", "resource_uri": uri},
	"token": token(roles, ""),
	"server": {"name": "database"},
}

# db://schema/<table> passes the same table rule as describe_table.
test_schema_resources_follow_tables if {
	allowed(schema_read("db://schema/orders", ["analyst"]))
	allowed(schema_read("db://schema/employees", ["admin"]))
	denied_with(schema_read("db://schema/employees", ["analyst"]), "table_not_allowed")
	denied_with(schema_read("db://schema/main.orders", ["analyst"]), "table_not_allowed")
	denied_with(schema_read("db://schema/orders/../employees", ["analyst"]), "table_not_allowed")
	denied_with(schema_read("db://schema/%65mployees", ["admin"]), "table_not_allowed")
	denied_with(schema_read("db://schema/", ["admin"]), "table_not_allowed")
	denied_with(schema_read("db://other/orders", ["admin"]), "table_not_allowed")
	denied_with(schema_read("DB://schema/orders", ["admin"]), "table_not_allowed")
	denied_with(schema_read("db://schema/products", ["viewer"]), "resource_not_allowed")
}

# ---------------------------------------------------------------- resources

resource_read(uri) := {
	"mcp": {"kind": "request", "method": "resources/read", "name": uri, "resource_uri": uri},
	"token": token(["viewer"], ""),
	"server": {"name": "files"},
}

test_resource_read_inside_prefix_allowed if {
	allowed(resource_read("file:///shared/a.txt"))
}

test_resource_read_outside_prefix_denied if {
	denied_with(resource_read("file:///secret/a.txt"), "path_not_allowed")
}

# Without the gateway's facts a URI is judged only in its plain canonical spelling: any escape,
# other scheme or host, or empty or dot segment is path_invalid (tests/policies/ checks that this
# is never more permissive than the facts, which decode canonical escapes).
test_resource_uri_spellings_invalid_without_facts if {
	every uri in [
		"file:///%74enants/acme/reports/a", "file:///shared%2Fa", "file:///shared/%2e%2e/x",
		"FILE:///shared/a", "file:/shared/a", "file://host/shared/a", "file:////shared/a",
		"file:///shared//a", "file:///shared/./a", "file:///shared/a?x", "file:///shared/a#x",
		"db://schema/x",
	] {
		denied_with(resource_read(uri), "path_invalid")
	}
}

test_resource_subscribe_follows_read_rules if {
	sub := json.patch(resource_read("file:///secret/a.txt"), [{"op": "replace", "path": "/mcp/method", "value": "resources/subscribe"}])
	denied_with(sub, "path_not_allowed")
	ok := json.patch(resource_read("file:///shared/a.txt"), [{"op": "replace", "path": "/mcp/method", "value": "resources/unsubscribe"}])
	allowed(ok)
}

test_completion_refused_on_files_server if {
	denied_with({
		"mcp": {"kind": "request", "method": "completion/complete"},
		"token": {"sub": "a", "roles": ["admin"], "tenant": "acme", "scope": ""},
		"server": {"name": "files"},
	}, "method_not_allowed")
}

# ---------------------------------------------------------------- obligations and lists

test_mask_pii_obligation_by_role if {
	d := decide(files("read_file", {"path": "shared/a"}, ["viewer"]))
	d.obligations.mask_pii == ["email", "phone", "card", "iban", "ssn"]
	# several roles: the most restrictive wins by default ...
	d2 := decide(files("read_file", {"path": "shared/a"}, ["viewer", "admin"]))
	d2.obligations.mask_pii == ["email", "phone", "card", "iban", "ssn"]
}

test_mask_pii_most_trusted_when_configured if {
	# ... and only what every role masks with mask_pii_combine: most_trusted
	inp := json.unmarshal(json.marshal(files("read_file", {"path": "shared/a"}, ["viewer", "admin"])))
	d := authz.decision with input.mcp as inp.mcp
		with input.token as inp.token
		with input.server as inp.server
		with data.gateway.mask_pii_combine as "most_trusted"
	d.obligations.mask_pii == []
}

test_visible_tools_filters_one_query if {
	inp := {
		"mcp": {"method": "tools/list"},
		"token": {"sub": "a", "roles": ["viewer"], "tenant": "acme", "scope": "tools:call:files/read_file tools:call:files/stat"},
		"server": {"name": "files"},
		"items": ["read_file", {"name": "write_file"}, {"name": "stat"}, {"name": "list_directory"}],
	}
	v := authz.visible_tools with input.mcp as inp.mcp
		with input.token as inp.token
		with input.server as inp.server
		with input.items as inp.items
	v == {"read_file", "stat"}
}

test_visible_tools_patterns_and_denied_caller if {
	inp := {"sub": "a", "roles": ["conformance"], "tenant": "acme", "scope": "tools:call:conformance/*"}
	v := authz.visible_tools with input.mcp as {"method": "tools/list"}
		with input.token as inp
		with input.server as {"name": "conformance"}
		with input.items as ["test_a", "other", {"name": "test_b"}]
	v == {"test_a", "test_b"}
	none := authz.visible_tools with input.mcp as {"method": "tools/list"}
		with input.token as {"sub": "a", "roles": ["conformance"], "scope": "tools:call:conformance/*"}
		with input.server as {"name": "conformance"}
		with input.items as ["test_a"]
	none == set()
}

# ---------------------------------------------------------------- bodyless requests (GET stream, DELETE session)

bodyless(http_method, roles) := {
	"mcp": {"kind": null, "method": null, "arguments": {}},
	"token": token(roles, ""),
	"server": {"name": "files"},
	"http_method": http_method,
}

decide_http(raw) := d if {
	inp := json.unmarshal(json.marshal(raw))
	d := authz.decision with input.mcp as inp.mcp
		with input.token as inp.token
		with input.server as inp.server
		with input.attributes.request.http.method as inp.http_method
}

test_get_stream_and_delete_session_allowed_for_known_roles if {
	d := decide_http(bodyless("GET", ["viewer"]))
	d.allow == true
	d.reason == "stream_allowed"
	d2 := decide_http(bodyless("DELETE", ["conformance"]))
	d2.allow == true
	d2.reason == "session_end_allowed"
}

test_bodyless_requests_need_a_known_role_and_method if {
	d := decide_http(bodyless("GET", ["intern"]))
	d.allow == false
	d.reason == "no_role"
	d2 := decide_http(bodyless("PUT", ["admin"]))
	d2.allow == false
	d2.reason == "method_not_allowed"
}

test_get_with_a_message_is_judged_by_the_message if {
	raw := object.union(bodyless("GET", ["viewer"]), {"mcp": {"kind": "request", "method": "sampling/createMessage"}})
	d := decide_http(raw)
	d.allow == false
	d.reason == "method_not_allowed"
}

# ---------------------------------------------------------------- erp (OpenAPI integration)

erp(tool, roles) := call("erp", tool, {"customerId": 1}, roles, "tools:call:erp/*")

test_erp_reads_by_role if {
	allowed(erp("listCustomers", ["analyst"]))
	allowed(erp("salesReport", ["viewer"]))
	denied_with(erp("getCustomer", ["viewer"]), "tool_not_allowed")
}

test_erp_writes_need_engineer_or_admin if {
	denied_with(erp("createOrder", ["analyst"]), "tool_not_allowed")
	denied_with(erp("cancelOrder", ["viewer"]), "tool_not_allowed")
	allowed(erp("createOrder", ["engineer"]))
	allowed(erp("cancelOrder", ["admin"]))
	denied_with(erp("updateOrderNotes", ["engineer"]), "tool_not_allowed")
}

test_erp_masks_all_pii_below_admin if {
	decide(erp("getCustomer", ["analyst"])).obligations.mask_pii == ["email", "phone", "card", "iban", "ssn"]
	decide(erp("listOrders", ["viewer"])).obligations.mask_pii == ["email", "phone", "card", "iban", "ssn"]
	decide(erp("getCustomer", ["admin"])).obligations.mask_pii == []
	# several roles: the most restrictive one wins
	decide(erp("getCustomer", ["analyst", "admin"])).obligations.mask_pii == ["email", "phone", "card", "iban", "ssn"]
	decide(files("read_file", {"path": "shared/a"}, ["analyst", "admin"])).obligations.mask_pii == ["card", "iban", "ssn"]

	# elsewhere the analyst role keeps its own, narrower mask
	decide(files("read_file", {"path": "shared/a"}, ["analyst"])).obligations.mask_pii == ["card", "iban", "ssn"]
}

# ---------------------------------------------------------------- prompt and resource lists

list_token(roles) := {"sub": "a", "roles": roles, "tenant": "acme", "scope": ""}

test_visible_prompts_by_role if {
	v := authz.visible_prompts with input.mcp as {"method": "prompts/list"}
		with input.token as list_token(["analyst"])
		with input.server as {"name": "database"}
		with input.items as ["summarize", {"name": "explain"}]
	v == {"summarize", "explain"}
	none := authz.visible_prompts with input.mcp as {"method": "prompts/list"}
		with input.token as list_token(["viewer"])
		with input.server as {"name": "database"}
		with input.items as ["summarize"]
	none == set()
}

test_visible_resources_follow_file_prefixes if {
	v := authz.visible_resources with input.mcp as {"method": "resources/list"}
		with input.token as list_token(["viewer"])
		with input.server as {"name": "files"}
		with input.kind as "resources"
		with input.items as ["file:///shared/a.txt", {"uri": "file:///secret/b.txt"}, "file:///tenants/globex/x", "ftp:/bad"]
	v == {"file:///shared/a.txt"}
}

test_visible_resource_templates_by_role if {
	v := authz.visible_resources with input.mcp as {"method": "resources/templates/list"}
		with input.token as list_token(["viewer"])
		with input.server as {"name": "files"}
		with input.kind as "resourceTemplates"
		with input.items as ["file:///{path}"]
	v == {"file:///{path}"}
	none := authz.visible_resources with input.mcp as {"method": "resources/list"}
		with input.token as list_token(["viewer"])
		with input.server as {"name": "database"}
		with input.kind as "resources"
		with input.items as ["db://orders"]
	none == set()
}

test_visible_schema_resources_follow_tables if {
	items := ["db://schema/orders", {"uri": "db://schema/employees"}, "db://schema/customers", "db://x/orders"]
	v := authz.visible_resources with input.mcp as {"method": "resources/list"}
		with input.token as list_token(["analyst"])
		with input.server as {"name": "database"}
		with input.kind as "resources"
		with input.items as items
	v == {"db://schema/orders", "db://schema/customers"}
	a := authz.visible_resources with input.mcp as {"method": "resources/list"}
		with input.token as list_token(["admin"])
		with input.server as {"name": "database"}
		with input.kind as "resources"
		with input.items as items
	a == {"db://schema/orders", "db://schema/employees", "db://schema/customers"}
	t := authz.visible_resources with input.mcp as {"method": "resources/templates/list"}
		with input.token as list_token(["analyst"])
		with input.server as {"name": "database"}
		with input.kind as "resourceTemplates"
		with input.items as [{"uriTemplate": "db://schema/{table}"}]
	t == {"db://schema/{table}"}
}

# ---------------------------------------------------------------- data.json invariants

# authz.rego compares prefixes without normalizing them: they must be written normalized.
test_data_file_prefixes_are_normalized if {
	every _, role in data.gateway.roles {
		every _, prefixes in role.files {
			every pfx in prefixes {
				pfx == authz.normalize_path(pfx)
			}
		}
	}
}

# ---------------------------------------------------------------- time (a third-party stdio server)

time_call(tool, roles) := call("time", tool, {"timezone": "UTC"}, roles, "tools:call:time/*")

test_time_tools_by_role if {
	allowed(time_call("get_current_time", ["viewer"]))
	allowed(time_call("convert_time", ["analyst"]))
	allowed(time_call("convert_time", ["engineer"]))
	denied_with(time_call("convert_time", ["viewer"]), "tool_not_allowed")
	denied_with(time_call("get_current_time", ["conformance"]), "tool_not_allowed")
}

# ---------------------------------------------------------------- data consistency

# A server's masking override names roles that exist (a misspelt role would never apply).
test_server_mask_overrides_name_known_roles if {
	every _, server in data.gateway.servers {
		every r, _ in object.get(server, "mask_pii", {}) {
			data.gateway.roles[r]
		}
	}
}
