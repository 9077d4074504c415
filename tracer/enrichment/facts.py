"""Moved: the fact model is `tracer.facts` (sensors and enrichment both add facts).

Kept as a re-export so branches written before the move still import; import
from `tracer.facts` in new code.
"""

from tracer.facts import (CACHED, INFERRED, KERNEL, LIVE, SENSOR, SOURCES, Fact, Facts,
                          SkipCounter)

__all__ = ["CACHED", "INFERRED", "KERNEL", "LIVE", "SENSOR", "SOURCES", "Fact", "Facts",
           "SkipCounter"]
