# Who may use the web console (docs/console.md). Entrypoint: data.mcp.console.decision, with the
# same decision contract as data.mcp.authz.decision (README.md). The console asks it on sign-in
# and again for every page and action, with the verified token's claims as input.token and the
# action as input.console.action: "view" (read a page, run the playground), "approve" (approve
# a tool definition in the catalog), "quarantine" (withdraw one: hidden, calls refused until
# approved again) or "export" (download audit entries as JSON lines, subjects opened: personal
# data leaves the gateway). Searching the audit trail on its page is "view"; every search and
# export is recorded in the audit trail with who ran it.
#
# Tenants: the console does not read input.token.tenant. The roles admitted here are global
# operator roles: they see and act on every tenant's catalog items and audit entries. Admit only
# operators of the whole gateway; a tenant's own administrators do not belong here.
#
# input: {"token": {"sub", "iss", "roles", "tenant", ...}, "console": {"action": "view"}}
package mcp.console

import rego.v1

# The roles that may sign in. A role not named here (viewer, engineer, ...) is refused, and so
# is a token without roles.
console_roles := {"admin", "security"}

# The roles that may change the catalog (approve a quarantined or new definition).
approve_roles := {"admin", "security"}

# The roles that may quarantine a tool. Kept apart from approve_roles: a policy may let more
# people pull a tool (an incident responder) than approve one.
quarantine_roles := {"admin", "security"}

# The roles that may export the audit trail (personal data, opened with audit.master_key).
export_roles := {"admin", "security"}

actions := {"view", "approve", "quarantine", "export"}

granted_roles := {r | some r in input.token.roles; r in console_roles}

allowed if {
	input.console.action == "view"
	count(granted_roles) > 0
}

allowed if {
	input.console.action == "approve"
	some r in input.token.roles
	r in approve_roles
}

allowed if {
	input.console.action == "quarantine"
	some r in input.token.roles
	r in quarantine_roles
}

allowed if {
	input.console.action == "export"
	some r in input.token.roles
	r in export_roles
}

default decision := {"allow": false, "reason": "console_role_required", "http_status": 403}

decision := {"allow": true, "reason": "console_role"} if allowed

known_action if input.console.action in actions

decision := {"allow": false, "reason": "unknown_console_action", "http_status": 400} if not known_action
