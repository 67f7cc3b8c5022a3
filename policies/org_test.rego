# Tests of the organisation rules' extension points (org.rego): each kind refuses the call and
# hides the tool from tools/list, without any edit of authz.rego.
#
# The fixture: a deny rule of package mcp.org defined here, so it exists in test runs only (test
# files never reach the serving bundle). It fires only for the token subject "org-fixture".
package mcp.org

import rego.v1

import data.mcp.authz

deny contains "fixture_stat_refused" if {
	input.token.sub == "org-fixture"
	authz.server_name == "files"
	authz.tool == "stat"
}

fixture_token(sub, roles, scope) := {"sub": sub, "roles": roles, "scope": scope, "tenant": "acme"}

no_org := {"restricting_roles": [], "required_scopes": {}, "disabled_tools": {}}

# The organisation rules' values are set with `with` here, next to the input; rego-cpp 1.5.2
# needs both normalized by a JSON round trip first and every `with` on the one expression
# (README.md, "rego-cpp 1.5.2 quirks").
fixture_call(token, tool, org_rules) := d if {
	t := json.unmarshal(json.marshal(token))
	org := json.unmarshal(json.marshal(org_rules))
	d := authz.decision with input.mcp as {"kind": "request", "method": "tools/call", "tool": tool, "arguments": {}}
		with input.token as t
		with input.server as {"name": "files"}
		with input.session as null
		with data.mcp.org.restricting_roles as org.restricting_roles
		with data.mcp.org.required_scopes as org.required_scopes
		with data.mcp.org.disabled_tools as org.disabled_tools
}

fixture_list(token, items, org_rules) := v if {
	t := json.unmarshal(json.marshal(token))
	org := json.unmarshal(json.marshal(org_rules))
	v := authz.visible_tools with input.mcp as {"kind": "request", "method": "tools/list"}
		with input.token as t
		with input.server as {"name": "files"}
		with input.items as items
		with data.mcp.org.restricting_roles as org.restricting_roles
		with data.mcp.org.required_scopes as org.required_scopes
		with data.mcp.org.disabled_tools as org.disabled_tools
}

files_tools := ["list_directory", "stat", "read_file"]

viewer_restricts := {"restricting_roles": ["viewer"], "required_scopes": {}, "disabled_tools": {}}

read_needs_scope := {"restricting_roles": [], "required_scopes": {"files": {"read_file": ["files:sensitive"]}}, "disabled_tools": {}}

stat_disabled := {"restricting_roles": [], "required_scopes": {}, "disabled_tools": {"files": ["stat"]}}

test_org_deny_rule_refuses_the_call_and_hides_the_tool if {
	token := fixture_token("org-fixture", ["admin"], "tools:call:files/*")
	d := fixture_call(token, "stat", no_org)
	d.allow == false
	d.reason == "fixture_stat_refused"
	fixture_call(token, "list_directory", no_org).allow == true
	fixture_list(token, files_tools, no_org) == {"list_directory", "read_file"}
}

test_org_deny_rule_leaves_other_callers_alone if {
	token := fixture_token("someone", ["admin"], "tools:call:files/*")
	fixture_call(token, "stat", no_org).allow == true
	fixture_list(token, files_tools, no_org) == {"list_directory", "stat", "read_file"}
}

test_restricting_role_limits_the_other_roles if {
	token := fixture_token("someone", ["admin", "viewer"], "tools:call:files/*")
	d := fixture_call(token, "write_file", viewer_restricts)
	d.allow == false
	d.reason == "tool_not_allowed"
	fixture_call(token, "stat", viewer_restricts).allow == true
	fixture_list(token, ["stat", "write_file", "search"], viewer_restricts) == {"stat"}
}

test_restricting_role_grants_nothing_itself if {
	token := fixture_token("someone", ["viewer"], "tools:call:files/*")
	d := fixture_call(token, "stat", viewer_restricts)
	d.allow == false
	d.reason == "tool_not_allowed"
	fixture_list(token, files_tools, viewer_restricts) == set()
}

test_required_scope_refuses_the_call_and_hides_the_tool if {
	token := fixture_token("someone", ["admin"], "tools:call:files/*")
	d := fixture_call(token, "read_file", read_needs_scope)
	d.allow == false
	d.reason == "insufficient_scope"
	d.missing_scope == "files:sensitive"
	fixture_list(token, files_tools, read_needs_scope) == {"list_directory", "stat"}
	scoped := fixture_token("someone", ["admin"], "tools:call:files/* files:sensitive")
	fixture_call(scoped, "read_file", read_needs_scope).allow == true
	fixture_list(scoped, files_tools, read_needs_scope) == {"list_directory", "stat", "read_file"}
}

test_disabled_tool_refused_for_everyone_and_hidden if {
	token := fixture_token("someone", ["admin"], "tools:call:files/*")
	d := fixture_call(token, "stat", stat_disabled)
	d.allow == false
	d.reason == "tool_disabled"
	fixture_call(token, "read_file", stat_disabled).allow == true
	fixture_list(token, files_tools, stat_disabled) == {"list_directory", "read_file"}
}
