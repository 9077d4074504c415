"""Enrichment: facts about the process, its namespaces and container, and the node.

`Enricher(host).enrich(event)` returns `Facts` (also stored on `event.facts`);
every fact names its source (live, kernel, inferred, cached) and origin file.
"""
