"""closedloop: a reproducible pipeline for closed-loop scaling (search → alignment → grounding)."""

__version__ = "0.1.0"
