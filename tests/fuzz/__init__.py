"""Fuzz support: example counters for hypothesis targets and atheris harnesses."""
