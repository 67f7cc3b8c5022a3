# OPA's own access control (opa run --authentication=token --authorization=basic): OPA asks
# data.system.authz.allow for every API request, with the caller's bearer token as
# input.identity. The gateway's token comes from OPA's environment (MCP_GATEWAY_OPA_TOKEN, from
# the same secret the gateway reads through policy.opa_token): it may query decisions and nothing
# else (no policy or data writes). Health probes need no token. An unset or short token admits no
# one, so a missing secret fails closed.
package system.authz

import rego.v1

default allow := false

min_token_chars := 32

gateway_token := opa.runtime().env.MCP_GATEWAY_OPA_TOKEN

allow if {
	input.method == "GET"
	input.path == ["health"]
}

allow if {
	count(gateway_token) >= min_token_chars
	input.identity == gateway_token
	input.method == "POST"
	input.path[0] == "v1"
	input.path[1] == "data"
}
