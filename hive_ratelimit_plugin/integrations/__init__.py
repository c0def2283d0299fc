"""Integrations with agent frameworks (attribution of LiteLLM calls without changes to them)."""
