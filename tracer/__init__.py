"""gputrace: explains why a process was denied access to a GPU device node.

Data flows one way: sensors -> enrichment -> verdict -> sinks.
"""

__version__ = "0.1.0"
