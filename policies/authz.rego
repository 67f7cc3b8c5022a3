# The enterprise example policy of the MCP gateway.
#
# Entrypoint: data.mcp.authz.decision (the decision contract is in README.md). List filters:
# data.mcp.authz.visible_tools, visible_prompts, visible_resources.
# Role, server and PII settings live in data.json (data.gateway); this file holds only logic.
# Organisation rules (extra denials, restricting roles, per-tool scopes) live in package mcp.org
# (org.rego, README.md "Organisation rules"): decision and the list filters read them here,
# so adding one never means editing this file.
#
# Shape: a request is allowed only when a positive grant for its method holds (`granted`).
# Denials are evaluated only for refused requests and exist to name the reason; since the grant
# alone opens the door, a rule left undefined by an unexpected input shape can only ever deny.
# The unit tests check that every denial case is also refused by the grants.
#
# Written for rego-cpp's cost model (README.md): input fields are referenced where they are used
# (a rule that aliases an input object copies it), alternatives are `else` chains (every body of
# a multi-body rule is evaluated), and the allowed tools/call path is a handful of lookups.
package mcp.authz

import rego.v1

method := input.mcp.method

# Strings only: a name of another type would reach concat() below, a type error in OPA.
server_name := input.server.name if is_string(input.server.name)

tool := input.mcp.tool if is_string(input.mcp.tool)

# Arguments are read only by name (input.mcp.arguments.<name>), never as a whole object: the
# engine then hands rego-cpp only those arguments (README.md, "The input"), so an argument this
# policy never reads costs nothing and does not make two otherwise equal decisions differ.

# ---------------------------------------------------------------- identity

# Roles the token carries that this policy knows; unknown role names grant nothing. (A key
# test: looking up data.gateway.roles[r] would copy the whole role object, ~40 us.)
known_role_names := object.keys(data.gateway.roles)

roles contains r if {
	some r in input.token.roles
	r in known_role_names
}

# ---------------------------------------------------------------- organisation rules (package mcp.org)

# Each read through a comprehension, so a missing rule reads as empty (README.md, "Organisation
# rules"; org.rego documents the shapes).
org_denials := {reason | some reason in data.mcp.org.deny}

# A restricting role grants nothing: its tools in data.json are the most its holder may call.
restricting_roles := {r | some r in data.mcp.org.restricting_roles} & roles

granting_roles := roles - restricting_roles

scope_list := split(input.token.scope, " ") if {
	is_string(input.token.scope)
} else := []

scopes := {s | some s in scope_list; s != ""}

tenant := input.token.tenant if {
	is_string(input.token.tenant)
	input.token.tenant != ""
}

known_server if data.gateway.servers[server_name]

# ---------------------------------------------------------------- method classes

is_notification if {
	is_string(method) # startswith() on null is a type error in OPA (a bodyless request)
	startswith(method, "notifications/")
}

# The client answering a server request (sampling, elicitation, roots) carries no method.
is_response if input.mcp.kind == "response"

is_open_method if {
	method in data.gateway.open_methods
	not files_completion # (files section)
}

is_open_method if is_notification

is_open_method if is_response

is_tool_call if method == "tools/call"

resource_methods := {"resources/read", "resources/subscribe", "resources/unsubscribe"}

is_resource_method if method in resource_methods

is_prompt_method if method == "prompts/get"

# GET (the SSE stream of a session) and DELETE (the end of a session) carry no JSON-RPC message.
bodyless_grants := {"GET": "stream_allowed", "DELETE": "session_end_allowed"}

bodyless_grant := bodyless_grants[input.attributes.request.http.method] if {
	input.mcp.method == null
	input.mcp.kind == null
}

is_bodyless_request if bodyless_grant

# ---------------------------------------------------------------- tools: RBAC and scopes

# A pattern is an exact tool name, "*", or a prefix ending in "*" ("test_*").
# The tool of this request: exact names first, patterns only when no exact name matched.
granting_role_lists_call if {
	some r in granting_roles
	tool in data.gateway.roles[r].tools[server_name]
} else := true if {
	some r in granting_roles
	some pattern in data.gateway.roles[r].tools[server_name]
	endswith(pattern, "*")
	startswith(tool, trim_suffix(pattern, "*"))
}

role_lists_tool(r, t) if {
	t in data.gateway.roles[r].tools[server_name]
} else := true if {
	some pattern in data.gateway.roles[r].tools[server_name]
	endswith(pattern, "*")
	startswith(t, trim_suffix(pattern, "*"))
}

restricting_role_refuses_call if {
	some r in restricting_roles
	t := tool
	not role_lists_tool(r, t)
}

role_grants_call if {
	granting_role_lists_call
	not restricting_role_refuses_call
}

required_scope := concat("", ["tools:call:", server_name, "/", tool])

server_scope := concat("", ["tools:call:", server_name, "/*"])

scope_grants_call if {
	required_scope in scope_list
} else := true if {
	server_scope in scope_list
}

# Scopes an organisation rule asks of this tool on top of tools:call (data.mcp.org.required_scopes).
org_missing_scopes := {s | some s in data.mcp.org.required_scopes[server_name][tool]} - scopes

org_scopes_grant_call if count(org_missing_scopes) == 0

# ---------------------------------------------------------------- tenant isolation

server_admits_tenant if {
	"*" in data.gateway.servers[server_name].tenants
} else := true if {
	tenant in data.gateway.servers[server_name].tenants
}

# A session created by one tenant is never used by another (the gateway fills input.session
# from its session store when it knows the session).
session_crosses_tenant if {
	input.session.tenant
	not tenant
}

session_crosses_tenant if input.session.tenant != tenant

# Any argument named like a tenant (tenant, tenant_id) must name the caller's tenant.
foreign_tenant_argument if {
	input.mcp.arguments.tenant != tenant
} else := true if {
	input.mcp.arguments.tenant_id != tenant
}

tenant_ok if {
	tenant
	server_admits_tenant
	not session_crosses_tenant
	not foreign_tenant_argument
}

# ---------------------------------------------------------------- files: path constraints

file_tools := {"list_directory", "stat", "read_file", "search", "write_file", "delete_file"}

is_file_tool if tool in file_tools

# Deleting a file needs a write prefix, like writing it.
write_tools := {"write_file", "delete_file"}

# (gateway/policy/facts.py PATH_ARGUMENT_NAMES; a Python test keeps the two in step.)
path_argument_names := {"path", "root", "directory", "source", "destination", "target"}

# Paths are relative to the files server's sandbox root; "" and "." name the root. A tool call
# with no path argument works on the root, so it is checked as the root.
#
# Each checked path is judged through its facts: {"well_formed": bool, "prefixes": [...],
# "tenant": ...} (README.md, "Path facts"). The gateway computes them in Python
# (input.mcp.facts, gateway/policy/facts.py) because string work costs far more in rego-cpp; an
# input without them (unit tests, list filtering) gets the same facts from path_facts() below.
# Python tests check that both give the same decisions.
# One body per name in path_argument_names: a static reference per argument (see above).
file_paths contains p if p := input.mcp.arguments.path

file_paths contains p if p := input.mcp.arguments.root

file_paths contains p if p := input.mcp.arguments.directory

file_paths contains p if p := input.mcp.arguments.source

file_paths contains p if p := input.mcp.arguments.destination

file_paths contains p if p := input.mcp.arguments.target

checked_path_facts := [input.mcp.facts.resource] if {
	is_resource_method
	input.mcp.facts.resource
} else := [path_facts(resource_path)] if {
	is_resource_method
} else := input.mcp.facts.arguments if {
	is_array(input.mcp.facts.arguments)
	count(input.mcp.facts.arguments) > 0
} else := [path_facts(p) | some p in file_paths] if {
	not input.mcp.facts
	count(file_paths) > 0
} else := [root_facts]

root_facts := {"well_formed": true, "prefixes": [""]}

# The gateway refuses longer or deeper paths before the policy (gateway.paths: MAX_PATH_CHARS,
# MAX_PATH_SEGMENTS); here they are simply not well formed.
max_path_chars := 4096

max_path_segments := 128

# Prefixes are listed for this many leading segments (gateway.policy.facts.MAX_PREFIX_DEPTH):
# no prefix in data.json is deeper (a Python test checks it), and the facts of a path stay
# linear in its length.
max_prefix_depth := 8

path_well_formed(p) if {
	is_string(p)
	count(p) <= max_path_chars
	not startswith(p, "/")
	not regex.match(`[\\]`, p) # a backslash (contains() misreads "\\" in rego-cpp 1.5.2)
	segments := split(p, "/")
	count(segments) <= max_path_segments
	not ".." in segments
}

# (Also what the data.json invariant test compares prefixes against.)
normalize_path(p) := concat("/", [part | some part in split(p, "/"); part != ""; part != "."])

# prefixes: "" and every leading run of up to max_prefix_depth segments of the normalized path
# ("a/b" -> "", "a", "a/b"), so "under a prefix" is plain membership. tenant: the second
# segment of a path under "tenants/" ("" for "tenants" itself); absent elsewhere.
path_facts(p) := object.union(
	{"well_formed": true, "prefixes": [concat("/", array.slice(parts, 0, i)) | some i in numbers.range(0, min([count(parts), max_prefix_depth]))]},
	path_tenant_fact(parts),
) if {
	path_well_formed(p)
	parts := [part | some part in split(p, "/"); part != ""; part != "."]
} else := {"well_formed": false}

path_tenant_fact(parts) := {"tenant": parts[1]} if {
	parts[0] == "tenants"
} else := {"tenant": ""} if {
	parts[0] == "tenants"
} else := {}

# "tenants/<t>/..." belongs to tenant <t>, whatever the role (admin included). (`!=`, not
# `not ... ==`: OPA makes a negated call with an undefined argument, here tenant, undefined.)
foreign_tenant_fact(f) if object.get(f, "tenant", tenant) != tenant

path_access := "write" if {
	tool in write_tools
} else := "read"

# Prefixes in data.json are written normalized (a unit test checks it), so only the {tenant}
# placeholder needs filling in here; "" (the root) admits every path.
allowed_prefixes contains replace(pfx, "{tenant}", tenant) if {
	some r in roles
	some pfx in data.gateway.roles[r].files[path_access]
}

# The prefixes without a placeholder, which need no replace() (a subset of allowed_prefixes).
plain_allowed_prefixes contains pfx if {
	some r in roles
	some pfx in data.gateway.roles[r].files[path_access]
	not contains(pfx, "{tenant}")
}

path_under_prefix(f) if {
	some q in f.prefixes
	q in allowed_prefixes
}

path_fact_ok(f) if {
	f.well_formed == true
	not foreign_tenant_fact(f)
	path_under_prefix(f)
}

# The common case first, read straight from input (a rule whose value is an input object copies
# it): a tool call whose path facts came from the gateway, every path under a plain prefix.
# Whenever that does not hold, the general check decides.
file_paths_ok if {
	not is_resource_method
	is_array(input.mcp.facts.arguments)
	count(input.mcp.facts.arguments) > 0
	every f in input.mcp.facts.arguments {
		f.well_formed == true
		object.get(f, "tenant", tenant) == tenant
		some q in f.prefixes
		q in plain_allowed_prefixes
	}
} else := true if {
	every f in checked_path_facts {
		path_fact_ok(f)
	}
}

# Why a path was refused (denials only).
malformed_paths contains f if {
	some f in checked_path_facts
	not f.well_formed == true
}

foreign_tenant_paths contains f if {
	some f in checked_path_facts
	f.well_formed == true
	foreign_tenant_fact(f)
}

paths_outside_prefixes contains f if {
	some f in checked_path_facts
	f.well_formed == true
	not path_under_prefix(f)
}

files_arguments_ok if {
	tool in file_tools
	file_paths_ok
}

# completion/complete on the files server would complete paths: a listing of directories by a
# door the path rules cannot judge (a partial value is no path). The files server offers no
# completions, and the policy refuses them there (method_not_allowed) should one appear.
files_completion if {
	server_name == "files"
	method == "completion/complete"
}

# ---------------------------------------------------------------- database: table constraints

allowed_tables := {lower(t) | some r in roles; some t in data.gateway.roles[r].tables}

table_allowed(t) if {
	is_string(t)
	regex.match(`^[A-Za-z_][A-Za-z0-9_]*$`, t)
	"*" in allowed_tables
}

table_allowed(t) if {
	is_string(t)
	lower(t) in allowed_tables
}

# The SQL text is never read here. The gateway parses it (gateway/policy/sql.py, sqlglot, as
# SQLite and as PostgreSQL) into input.mcp.facts.sql = {"understood", "tables", "functions"}
# (README.md, "SQL facts"); the database server parses the same text with the same function and
# makes the engine read only those tables and call only data.gateway.sql_functions. No facts, or
# facts that do not say understood, refuse the query.
sql_understood if {
	input.mcp.facts.sql.understood == true
	is_array(input.mcp.facts.sql.tables)
	is_array(input.mcp.facts.sql.functions)
}

# A qualified name ("main.employees") is only allowed where data.json lists it as written.
sql_tables_ok if {
	sql_understood
	every t in input.mcp.facts.sql.tables {
		table_allowed(t)
	}
}

sql_function_allowlist := {f | some f in data.gateway.sql_functions}

sql_functions_ok if {
	sql_understood
	every f in input.mcp.facts.sql.functions {
		f in sql_function_allowlist
	}
}

# A rule, so that `not describe_table_ok` means the same in rego-cpp and OPA when the argument
# is absent (README.md, "Engine differences": a negated call with an undefined argument).
describe_table_ok if table_allowed(input.mcp.arguments.table)

# insert_row / delete_row (the database server's single-row writes, on the tables it was started
# with as writable) take a table name and never SQL: the role must list that table too.
row_write_tools := {"insert_row", "delete_row"}

database_arguments_ok if {
	tool == "query"
	sql_tables_ok
	sql_functions_ok
} else := true if {
	tool == "describe_table"
	describe_table_ok
} else := true if {
	tool in row_write_tools
	describe_table_ok
} else := true if {
	tool == "list_tables"
}

# ---------------------------------------------------------------- argument constraints by server

# Servers whose arguments have rules of their own; `not server_with_argument_rules` rather than
# `not server_name in {...}`, which OPA leaves undefined when server_name is.
server_with_argument_rules if server_name in {"files", "database"}

arguments_ok if {
	server_name == "files"
	files_arguments_ok
} else := true if {
	server_name == "database"
	database_arguments_ok
} else := true if {
	not server_with_argument_rules
}

# ---------------------------------------------------------------- resources and prompts

role_grants_server(kind, server) if {
	some r in roles
	server in data.gateway.roles[r][kind]
}

# This request's server, as rules: `not role_grants_resources` is true in OPA too when
# server_name is undefined (a negated call with an undefined argument is not).
role_grants_resources if role_grants_server("resources", server_name)

role_grants_prompts if role_grants_server("prompts", server_name)

# "file:///shared/a.txt" -> "shared/a.txt". The gateway's facts accept a URI only in the one
# spelling the files server reads it in (gateway.paths.file_uri_path, percent-escapes included);
# this fallback (list filtering, unit tests) accepts a subset of those: no '%' at all, no empty
# or dot segments. Anything else is the malformed path "/", so it is never more permissive.
uri_path(uri) := substring(uri, 8, -1) if {
	is_string(uri)
	count(uri) <= max_path_chars
	regex.match(`^file:///([A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*)?$`, uri)
	not regex.match(`(^|/)\.{1,2}(/|$)`, substring(uri, 8, -1))
} else := "/" # not well formed: refused

resource_path := uri_path(input.mcp.resource_uri)

resource_ok if {
	server_name == "files"
	role_grants_resources
	file_paths_ok
} else := true if {
	server_name == "database"
	role_grants_resources
	database_resource_ok
} else := true if {
	not server_with_argument_rules
	role_grants_resources
}

# The database server's resources are table schemas, db://schema/<table>: the same table rule
# as describe_table and query. Any other URI names no table and is refused.
schema_uri_table(uri) := substring(uri, count("db://schema/"), -1) if {
	is_string(uri)
	startswith(uri, "db://schema/")
}

database_resource_table := schema_uri_table(input.mcp.resource_uri)

database_resource_ok if table_allowed(database_resource_table)

# ---------------------------------------------------------------- grants

# Arguments are an object, null or absent (the gateway's parser already insists; the policy does
# not rely on it). Type tests only: they keep the type of input.mcp.arguments, not its contents.
arguments_well_formed if {
	is_object(input.mcp.arguments)
} else := true if {
	is_null(input.mcp.arguments)
} else := true if {
	not arguments_type # absent (`not type_name(...)` itself is never true in OPA when absent)
}

arguments_type := type_name(input.mcp.arguments)

tool_call_ok if {
	arguments_well_formed
	role_grants_call
	scope_grants_call
	org_scopes_grant_call
	tenant_ok
	arguments_ok
}

# Any known role may use the protocol itself on a known server.
caller_may_connect if {
	count(roles) > 0
	known_server
	not session_crosses_tenant
}

# The common case first: the chain stops at the first grant that holds.
granted := "tool_allowed" if {
	is_tool_call
	tool_call_ok
} else := "method_allowed" if {
	is_open_method
	caller_may_connect
} else := bodyless_grant if {
	is_bodyless_request
	caller_may_connect
} else := "resource_allowed" if {
	is_resource_method
	tenant_ok
	resource_ok
} else := "prompt_allowed" if {
	is_prompt_method
	tenant_ok
	role_grants_prompts
}

# ---------------------------------------------------------------- denials: [priority, reason, missing scope]

denials contains [10, "no_role", ""] if count(roles) == 0

denials contains [20, "unknown_server", ""] if not known_server

denials contains [30, "session_tenant_mismatch", ""] if session_crosses_tenant

denials contains [31, "tenant_required", ""] if {
	not is_open_method
	not is_bodyless_request
	not tenant
}

denials contains [32, "tenant_not_admitted", ""] if {
	not is_open_method
	not is_bodyless_request
	tenant
	not server_admits_tenant
}

denials contains [33, "tenant_mismatch", ""] if {
	not is_open_method
	foreign_tenant_argument
}

denials contains [40, "method_not_allowed", ""] if {
	not is_open_method
	not is_tool_call
	not is_resource_method
	not is_prompt_method
	not is_bodyless_request
}

denials contains [49, "tool_missing", ""] if {
	is_tool_call
	not tool
}

denials contains [50, "arguments_invalid", ""] if {
	is_tool_call
	not arguments_well_formed
}

denials contains [51, "tool_not_allowed", ""] if {
	is_tool_call
	tool
	not role_grants_call
}

# Only when the role would allow the tool: asking the user for more scope must be able to help.
denials contains [52, "insufficient_scope", required_scope] if {
	is_tool_call
	role_grants_call
	not scope_grants_call
}

denials contains [53, "insufficient_scope", concat(" ", sort(org_missing_scopes))] if {
	is_tool_call
	role_grants_call
	scope_grants_call
	not org_scopes_grant_call
}

# Path denials apply to tools/call and resources/* on the files server alike.
checks_file_paths if {
	server_name == "files"
	is_tool_call
}

checks_file_paths if {
	server_name == "files"
	is_resource_method
}

denials contains [60, "path_invalid", ""] if {
	checks_file_paths
	count(malformed_paths) > 0
}

denials contains [61, "path_other_tenant", ""] if {
	checks_file_paths
	count(foreign_tenant_paths) > 0
}

denials contains [62, "path_not_allowed", ""] if {
	checks_file_paths
	count(paths_outside_prefixes) > 0
}

denials contains [63, "unknown_file_tool", ""] if {
	is_tool_call
	server_name == "files"
	tool
	not is_file_tool
}

denials contains [70, "sql_not_understood", ""] if {
	is_tool_call
	server_name == "database"
	tool == "query"
	not sql_understood
}

denials contains [71, "table_not_allowed", ""] if {
	is_tool_call
	server_name == "database"
	tool == "query"
	sql_understood
	not sql_tables_ok
}

denials contains [72, "table_not_allowed", ""] if {
	is_tool_call
	server_name == "database"
	tool == "describe_table"
	not describe_table_ok
}

denials contains [72, "table_not_allowed", ""] if {
	is_tool_call
	server_name == "database"
	tool in row_write_tools
	not describe_table_ok
}

denials contains [73, "function_not_allowed", ""] if {
	is_tool_call
	server_name == "database"
	tool == "query"
	sql_understood
	not sql_functions_ok
}

denials contains [74, "table_not_allowed", ""] if {
	is_resource_method
	server_name == "database"
	role_grants_resources
	not database_resource_ok
}

denials contains [80, "resource_not_allowed", ""] if {
	is_resource_method
	not role_grants_resources
}

denials contains [81, "prompt_not_allowed", ""] if {
	is_prompt_method
	not role_grants_prompts
}

# The denial with the lowest priority number names the reason. (min, not sort(...)[0]:
# rego-cpp 1.5 leaves an index into a sort() result undefined.)
first_denial := min(denials)

# ---------------------------------------------------------------- obligations

# A caller with several roles gets the kinds any of its roles masks (the most restrictive role
# wins), unless data.gateway.mask_pii_combine is "most_trusted" (only what every role masks).
# A server may override what a role masks there (data.gateway.servers.<s>.mask_pii.<role>).
# The one-role case is the common one and is plain lookups (functions cost far more in rego-cpp).
single_role := r if {
	count(roles) == 1
	some r in roles
}

mask_pii := m if {
	m := data.gateway.servers[server_name].mask_pii[single_role]
} else := m if {
	m := data.gateway.roles[single_role].mask_pii
	is_array(m)
} else := [kind |
	some kind in data.gateway.pii_kinds
	every r in roles {
		kind in role_mask_pii(r)
	}
] if {
	count(roles) > 0
	data.gateway.mask_pii_combine == "most_trusted"
} else := [kind |
	some kind in data.gateway.pii_kinds
	some_role_masks(kind)
] if {
	count(roles) > 0
} else := data.gateway.pii_kinds

some_role_masks(kind) if {
	some r in roles
	kind in role_mask_pii(r)
}

role_mask_pii(r) := data.gateway.servers[server_name].mask_pii[r] if {
	data.gateway.servers[server_name].mask_pii[r]
} else := data.gateway.roles[r].mask_pii if {
	is_array(data.gateway.roles[r].mask_pii)
} else := data.gateway.pii_kinds

obligations := {"mask_pii": mask_pii}

# ---------------------------------------------------------------- the decision

default decision := {
	"allow": false,
	"reason": "default_deny",
	"http_status": 403,
	"headers": {},
	"obligations": {},
}

# An organisation denial refuses what the core rules grant; the smallest reason names it.
decision := {
	"allow": true,
	"reason": granted,
	"http_status": 200,
	"headers": {},
	"obligations": obligations,
} if {
	granted
	count(org_denials) == 0
} else := {
	"allow": false,
	"reason": min(org_denials),
	"http_status": 403,
	"headers": {},
	"obligations": {},
} if {
	granted
} else := {
	"allow": false,
	"reason": first_denial[1],
	"http_status": 403,
	"headers": {},
	"obligations": {},
	"missing_scope": first_denial[2],
} if {
	first_denial[2] != ""
} else := {
	"allow": false,
	"reason": first_denial[1],
	"http_status": 403,
	"headers": {},
	"obligations": {},
} if {
	first_denial
}

# ---------------------------------------------------------------- list filtering (one query for a whole list)

# input.items: names (URIs for resources) or the listed objects themselves. Arguments are unknown
# at listing time, so visibility is RBAC + scope + tenant (+ the path of a files resource).
item_name(item) := item if is_string(item)

item_name(item) := item.name if is_string(item.name)

item_uri(item) := item if is_string(item)

item_uri(item) := item.uri if is_string(item.uri)

item_uri(item) := item.uriTemplate if is_string(item.uriTemplate)

list_caller_ok if {
	count(roles) > 0
	tenant
	server_admits_tenant
	not session_crosses_tenant
}

# Set algebra over the whole page instead of one function call per item: rego-cpp charges per
# call, and a page can hold hundreds of tools.
listed_names := {i | some i in input.items; is_string(i)} | {i.name | some i in input.items; is_string(i.name)}

role_tool_patterns := {p | some r in granting_roles; some p in data.gateway.roles[r].tools[server_name]}

# The wildcard patterns first, so the page is walked once per wildcard, not once per pattern.
role_wildcard_prefixes := {trim_suffix(p, "*") | some p in role_tool_patterns; endswith(p, "*")}

role_visible_tools := ((listed_names & role_tool_patterns) | {n |
	some w in role_wildcard_prefixes
	some n in listed_names
	startswith(n, w)
}) - restricted_tools

# Tools some restricting role of the caller does not list.
restricted_tools := {n |
	some r in restricting_roles
	some n in listed_names
	not role_lists_tool(r, n)
}

scope_prefix := concat("", ["tools:call:", server_name, "/"])

scope_visible_tools := role_visible_tools if {
	server_scope in scope_list
} else := role_visible_tools & {trim_prefix(s, scope_prefix) | some s in scope_list; startswith(s, scope_prefix)}

# Tools an organisation rule refuses: missing required scopes, or a call of the tool without
# arguments that a deny rule refuses (evaluated once per tool the caller could otherwise see,
# never for the whole page).
org_hidden_tools := {n |
	some n in scope_visible_tools
	some s in data.mcp.org.required_scopes[server_name][n]
	not scopes[s]
} | {n |
	some n in scope_visible_tools
	org_denies_listed_tool(n)
}

org_denies_listed_tool(n) if {
	count(org_denials) > 0 with input.mcp.method as "tools/call"
		with input.mcp.tool as n
}

default visible_tools := set()

visible_tools := scope_visible_tools - org_hidden_tools if list_caller_ok

visible_prompts contains name if {
	list_caller_ok
	role_grants_prompts
	some item in input.items
	name := item_name(item)
}

# A files resource is listed only where resources/read of it would be allowed; templates (and
# other servers' resources) by role alone.
resource_item_visible(_) if not server_with_argument_rules

resource_item_visible(_) if input.kind == "resourceTemplates"

resource_item_visible(uri) if {
	server_name == "files"
	not input.kind == "resourceTemplates"
	path_fact_ok(path_facts(uri_path(uri)))
}

resource_item_visible(uri) if {
	server_name == "database"
	not input.kind == "resourceTemplates"
	table_allowed(schema_uri_table(uri))
}

visible_resources contains uri if {
	list_caller_ok
	role_grants_resources
	some item in input.items
	uri := item_uri(item)
	resource_item_visible(uri)
}
