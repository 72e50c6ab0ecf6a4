"""Serving: the engine loop behind an OpenAI-compatible HTTP API (colocated mode today)."""
