# Organisation rules: what an organisation adds to the core rules (authz.rego) without editing
# them. authz.rego reads each rule below by name (data.mcp.org.<name>), for the decision and for
# the list filters alike, so a tool refused here is also never listed. README.md ("Organisation
# rules") has the walkthrough; org_test.rego shows each kind at work.
#
# Rules here may read the core's view of the request: data.mcp.authz.roles, tool, server_name,
# tenant, scopes, method; never data.mcp.authz.decision or the visible_* lists (a cycle).
package mcp.org

import rego.v1

# Restricting roles, a set of role names: a caller holding one gets at most the tools that role's
# data.json entry lists for the server (patterns as in any role), whatever its other roles grant;
# it grants nothing itself. The role must exist in data.json (data.gateway.roles) like any other.
# Example: {"contractor"}.
restricting_roles := set()

# Scopes a tool needs on top of tools:call:<server>/<tool> (or /*): {server: {tool: [scope]}}.
# A call without one is refused as insufficient_scope naming the missing scopes, and the tool is
# not listed to that caller. Example: {"database": {"query": ["db:query"]}}.
required_scopes := {}

# Tools switched off for everyone, whatever the roles: {server: [tool]}. Example:
# {"files": ["write_file"]} during a freeze.
disabled_tools := {}

# Extra denials: each `deny contains "<reason>" if { ... }` refuses a request the core rules
# would allow, with <reason> as the decision's reason (snake_case, ^[a-z][a-z0-9_]{0,63}$; the
# smallest names it when several hold). tools/list hides a tool when a call of it without
# arguments would be refused (the rules run once per tool the caller could otherwise see).
deny contains "tool_disabled" if {
	some disabled in disabled_tools[data.mcp.authz.server_name]
	disabled == data.mcp.authz.tool
}
