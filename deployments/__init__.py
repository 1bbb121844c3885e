"""Orchestration set-up that is not a flow: automations as code (`deployments.automations`)."""
