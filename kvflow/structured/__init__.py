"""Structured output: JSON schema, regex, choice and grammar constraints via llguidance."""
