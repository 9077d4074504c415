"""Sinks: where explained events go (console, JSON lines, journal, metrics, report)."""
