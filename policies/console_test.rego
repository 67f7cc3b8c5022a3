package mcp.console_test

import rego.v1

import data.mcp.console

test_admin_views if {
	console.decision.allow with input.token as {"sub": "a", "roles": ["admin"]} with input.console as {"action": "view"}
}

test_security_approves if {
	console.decision.allow with input.token as {"sub": "s", "roles": ["viewer", "security"]} with input.console as {"action": "approve"}
}

test_viewer_refused if {
	d := console.decision with input.token as {"sub": "v", "roles": ["viewer"]} with input.console as {"action": "view"}
	not d.allow
	d.reason == "console_role_required"
	d.http_status == 403
}

test_no_roles_refused if {
	not console.decision.allow with input.token as {"sub": "n"} with input.console as {"action": "view"}
}

test_roles_not_a_list_refused if {
	not console.decision.allow with input.token as {"sub": "n", "roles": "admin"} with input.console as {"action": "view"}
}

test_unknown_action_refused if {
	d := console.decision with input.token as {"sub": "a", "roles": ["admin"]} with input.console as {"action": "delete"}
	not d.allow
	d.reason == "unknown_console_action"
}

test_security_quarantines if {
	console.decision.allow with input.token as {"sub": "s", "roles": ["security"]} with input.console as {"action": "quarantine"}
}

test_viewer_may_not_quarantine if {
	not console.decision.allow with input.token as {"sub": "v", "roles": ["viewer"]} with input.console as {"action": "quarantine"}
}

test_security_exports if {
	console.decision.allow with input.token as {"sub": "s", "roles": ["security"]} with input.console as {"action": "export"}
}

test_viewer_may_not_export if {
	not console.decision.allow with input.token as {"sub": "v", "roles": ["viewer"]} with input.console as {"action": "export"}
}

# Console roles are global: the tenant of the token changes nothing (console.rego, "Tenants").
test_console_roles_ignore_the_tenant if {
	console.decision.allow with input.token as {"sub": "a", "roles": ["security"], "tenant": "acme"} with input.console as {"action": "export"}
	console.decision.allow with input.token as {"sub": "a", "roles": ["security"]} with input.console as {"action": "export"}
}
