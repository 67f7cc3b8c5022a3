"""Workflow orchestration: tools that run several tool calls on other servers through the gateway
as the caller, with compensation, approvals and a durable run record (docs/workflows.md)."""
