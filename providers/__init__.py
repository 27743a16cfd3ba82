"""Upstream providers by config kind: a literal registry, no discovery. Each is a module of plain functions."""
from providers import gemini, lyria, openai

PROVIDERS = {"openai": openai, "gemini": gemini, "lyria": lyria}
