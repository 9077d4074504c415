"""Enrichment: facts about the process, its namespaces and container, and the node."""
