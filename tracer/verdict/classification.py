"""What the catalog decides for a denial, before it becomes a `Verdict`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Classification:
    reason: str
    confidence: str
    evidence: list[str]                       # fact names, most telling first
    context: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    summary: Optional[str] = None             # a story told from the facts, over the template
