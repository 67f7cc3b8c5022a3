# The enterprise example policy of the MCP gateway.
#
# Entrypoint: data.mcp.authz.decision (the decision contract is in README.md).
# Role, server and PII settings live in data.json (data.gateway); this file holds only logic.
#
# Shape: a request is allowed only when a positive grant for its method holds (`granted`).
# Denials are evaluated only for refused requests and exist to name the reason; since the grant
# alone opens the door, a rule left undefined by an unexpected input shape can only ever deny.
# The unit tests check that every denial case is also refused by the grants.
package mcp.authz

import rego.v1


claims := input.token

mcp := input.mcp

method := mcp.method

server_name := input.server.name

server_cfg := data.gateway.servers[server_name]

arguments := mcp.arguments if {
	is_object(mcp.arguments)
} else := {}

# ---------------------------------------------------------------- identity

# Roles the token carries that this policy knows; unknown role names grant nothing.
roles contains r if {
	some r in claims.roles
	data.gateway.roles[r]
}

scopes contains s if {
	is_string(claims.scope)
	some s in split(claims.scope, " ")
	s != ""
}

tenant := claims.tenant if {
	is_string(claims.tenant)
	claims.tenant != ""
}

# ---------------------------------------------------------------- method classes

is_notification if startswith(method, "notifications/")

# The client answering a server request (sampling, elicitation, roots) carries no method.
is_response if mcp.kind == "response"

is_open_method if method in data.gateway.open_methods

is_open_method if is_notification

is_open_method if is_response

is_tool_call if method == "tools/call"

resource_methods := {"resources/read", "resources/subscribe", "resources/unsubscribe"}

is_resource_method if method in resource_methods

is_prompt_method if method == "prompts/get"

# ---------------------------------------------------------------- tools: RBAC and scopes

# A pattern is an exact tool name, "*", or a prefix ending in "*" ("test_*").
pattern_matches(pattern, name) if pattern == name

pattern_matches(pattern, name) if {
	endswith(pattern, "*")
	startswith(name, trim_suffix(pattern, "*"))
}

role_grants_tool(server, tool) if {
	some r in roles
	some pattern in data.gateway.roles[r].tools[server]
	pattern_matches(pattern, tool)
}

required_scope(server, tool) := sprintf("tools:call:%s/%s", [server, tool])

scope_grants_tool(server, tool) if required_scope(server, tool) in scopes

scope_grants_tool(server, _) if sprintf("tools:call:%s/*", [server]) in scopes

tool := mcp.tool if is_string(mcp.tool)

# ---------------------------------------------------------------- tenant isolation

server_admits_tenant if "*" in server_cfg.tenants

server_admits_tenant if tenant in server_cfg.tenants

# A session created by one tenant is never used by another (the gateway fills input.session
# from its session store when it knows the session).
session_tenant := input.session.tenant

session_crosses_tenant if {
	session_tenant
	not tenant
}

session_crosses_tenant if session_tenant != tenant

# Any argument named like a tenant must name the caller's tenant.
tenant_argument_names := {"tenant", "tenant_id"}

foreign_tenant_argument if {
	some key in tenant_argument_names
	value := arguments[key]
	value != tenant
}

tenant_ok if {
	tenant
	server_admits_tenant
	not session_crosses_tenant
	not foreign_tenant_argument
}

# ---------------------------------------------------------------- files: path constraints

file_tools := {"list_directory", "stat", "read_file", "search", "write_file"}

write_tools := {"write_file"}

path_argument_names := {"path", "root", "directory", "source", "destination", "target"}

# Paths are relative to the files server's sandbox root; "" and "." name the root. A tool call
# with no path argument works on the root, so it is checked as the root. Everything below is a
# rule over the few paths of this request (rules are evaluated once per query; functions are
# re-evaluated on every call, which rego-cpp makes expensive).
file_paths contains p if {
	some key in path_argument_names
	p := arguments[key]
}

checked_file_paths := {resource_path} if {
	is_resource_method
} else := file_paths if {
	count(file_paths) > 0
} else := {""}

path_well_formed(p) if {
	is_string(p)
	not startswith(p, "/")
	not regex.match(`[\\]`, p) # a backslash (contains() misreads "\\" in rego-cpp 1.5.2)
	not ".." in split(p, "/")
}

normalize_path(p) := concat("/", [part | some part in split(p, "/"); part != ""; part != "."])

malformed_paths contains p if {
	some p in checked_file_paths
	not path_well_formed(p)
}

# Well-formed paths, normalized: "./shared//a" -> "shared/a".
normalized_paths := {p: normalize_path(p) | some p in checked_file_paths; path_well_formed(p)}

# "tenants/<t>/..." belongs to tenant <t>, whatever the role (admin included).
foreign_tenant_paths contains n if {
	some n in normalized_paths
	parts := split(n, "/")
	parts[0] == "tenants"
	not parts[1] == tenant
}

path_access := "write" if {
	tool in write_tools
} else := "read"

allowed_prefixes contains normalize_path(replace(pfx, "{tenant}", tenant)) if {
	some r in roles
	some pfx in data.gateway.roles[r].files[path_access]
}

under_prefix(n, "")

under_prefix(n, pfx) if n == pfx

under_prefix(n, pfx) if startswith(n, concat("", [pfx, "/"]))

paths_outside_prefixes contains n if {
	some n in normalized_paths
	not path_under_some_prefix(n)
}

path_under_some_prefix(n) if {
	some pfx in allowed_prefixes
	under_prefix(n, pfx)
}

file_paths_ok if {
	count(malformed_paths) == 0
	count(foreign_tenant_paths) == 0
	count(paths_outside_prefixes) == 0
}

files_arguments_ok if {
	tool in file_tools
	file_paths_ok
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

sql := arguments.sql if is_string(arguments.sql)

sql_text := lower(trim_space(sql))

# Not a SQL parser: anything this check cannot read with certainty is refused. The database
# server enforces read-only access itself; this decides which tables a role may read.
sql_shape_ok if {
	regex.match(`^select\s`, sql_text)
	not contains(sql_text, ";")
	not contains(sql_text, "--")
	not contains(sql_text, "/*")
	not regex.match(`\b(insert|update|delete|drop|alter|create|attach|detach|pragma|copy|grant|revoke|truncate|replace|into|exec|execute|call|vacuum|load_extension|sqlite_\w*|pg_\w*|information_schema)\b`, sql_text)
	not regex.match(`\bfrom\s+[a-z_][a-z0-9_]*(\s+(as\s+)?[a-z_][a-z0-9_]*)?\s*,`, sql_text)
}

sql_tables := [m[1] | some m in regex.find_all_string_submatch_n(`\b(?:from|join)\s*([^\s,;]+)`, sql_text, -1)]

sql_tables_ok if {
	count(sql_tables) > 0
	every t in sql_tables {
		table_allowed(t)
	}
}

database_arguments_ok if {
	tool == "query"
	sql_shape_ok
	sql_tables_ok
}

database_arguments_ok if {
	tool == "describe_table"
	table_allowed(arguments.table)
}

database_arguments_ok if tool == "list_tables"

# ---------------------------------------------------------------- argument constraints by server

arguments_ok if {
	server_name == "files"
	files_arguments_ok
}

arguments_ok if {
	server_name == "database"
	database_arguments_ok
}

arguments_ok if not server_name in {"files", "database"}

# ---------------------------------------------------------------- resources and prompts

role_grants_server(kind, server) if {
	some r in roles
	server in data.gateway.roles[r][kind]
}

# "file:///shared/a.txt" -> "shared/a.txt"; a URI of any other form is refused.
resource_path := trim_left(regex.replace(mcp.resource_uri, `^[a-z][a-z0-9+.-]*://`, ""), "/") if {
	is_string(mcp.resource_uri)
	regex.match(`^[a-z][a-z0-9+.-]*://`, mcp.resource_uri)
} else := "/" # not well formed: refused

resource_ok if {
	server_name == "files"
	role_grants_server("resources", server_name)
	file_paths_ok
}

resource_ok if {
	server_name != "files"
	role_grants_server("resources", server_name)
}

# ---------------------------------------------------------------- grants

# Arguments are an object or absent (the gateway's parser already insists; the policy does not
# rely on it).
arguments_well_formed if not mcp.arguments

arguments_well_formed if mcp.arguments == null

arguments_well_formed if is_object(mcp.arguments)

tool_call_ok if {
	arguments_well_formed
	role_grants_tool(server_name, tool)
	scope_grants_tool(server_name, tool)
	tenant_ok
	arguments_ok
}

granted := "method_allowed" if {
	is_open_method
	count(roles) > 0
	server_cfg
	not session_crosses_tenant
}

granted := "tool_allowed" if {
	is_tool_call
	tool_call_ok
}

granted := "resource_allowed" if {
	is_resource_method
	tenant_ok
	resource_ok
}

granted := "prompt_allowed" if {
	is_prompt_method
	tenant_ok
	role_grants_server("prompts", server_name)
}

# ---------------------------------------------------------------- denials: [priority, reason, missing scope]

denials contains [10, "no_role", ""] if count(roles) == 0

denials contains [20, "unknown_server", ""] if not server_cfg

denials contains [30, "session_tenant_mismatch", ""] if session_crosses_tenant

denials contains [31, "tenant_required", ""] if {
	not is_open_method
	not tenant
}

denials contains [32, "tenant_not_admitted", ""] if {
	not is_open_method
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
	not role_grants_tool(server_name, tool)
}

# Only when the role would allow the tool: asking the user for more scope must be able to help.
denials contains [52, "insufficient_scope", required_scope(server_name, tool)] if {
	is_tool_call
	role_grants_tool(server_name, tool)
	not scope_grants_tool(server_name, tool)
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
	not tool in file_tools
}

denials contains [70, "sql_not_understood", ""] if {
	is_tool_call
	server_name == "database"
	tool == "query"
	not sql_shape_ok
}

denials contains [71, "table_not_allowed", ""] if {
	is_tool_call
	server_name == "database"
	tool == "query"
	sql_shape_ok
	not sql_tables_ok
}

denials contains [72, "table_not_allowed", ""] if {
	is_tool_call
	server_name == "database"
	tool == "describe_table"
	not table_allowed(arguments.table)
}

denials contains [80, "resource_not_allowed", ""] if {
	is_resource_method
	not role_grants_server("resources", server_name)
}

denials contains [81, "prompt_not_allowed", ""] if {
	is_prompt_method
	not role_grants_server("prompts", server_name)
}

# The denial with the lowest priority number names the reason. (min, not sort(...)[0]:
# rego-cpp 1.5 leaves an index into a sort() result undefined.)
first_denial := min(denials)

# ---------------------------------------------------------------- obligations

# A PII kind stays masked only if every role of the caller masks it: the most trusted role wins.
# (The one-role case is the common one and is a plain lookup.)
mask_pii := data.gateway.roles[r].mask_pii if {
	count(roles) == 1
	some r in roles
} else := sort([kind |
	some kind in data.gateway.pii_kinds
	every r in roles {
		kind in data.gateway.roles[r].mask_pii
	}
]) if {
	count(roles) > 0
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

decision := {
	"allow": true,
	"reason": granted,
	"http_status": 200,
	"headers": {},
	"obligations": obligations,
} if {
	granted
}

decision := {
	"allow": false,
	"reason": first_denial[1],
	"http_status": 403,
	"headers": {},
	"obligations": {},
	"missing_scope": first_denial[2],
} if {
	not granted
	first_denial[2] != ""
}

decision := {
	"allow": false,
	"reason": first_denial[1],
	"http_status": 403,
	"headers": {},
	"obligations": {},
} if {
	not granted
	first_denial[2] == ""
}

# ---------------------------------------------------------------- list filtering (one query for a whole list)

# input.items: tool names or tool objects with a "name" (a tools/list result). Arguments are
# unknown at listing time, so visibility is RBAC + scope + tenant only.
item_name(item) := item if is_string(item)

item_name(item) := item.name if is_string(item.name)

visible_tools contains name if {
	count(roles) > 0
	tenant
	server_admits_tenant
	not session_crosses_tenant
	some item in input.items
	name := item_name(item)
	role_grants_tool(server_name, name)
	scope_grants_tool(server_name, name)
}
