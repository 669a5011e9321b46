"""vidrep: visual representations learned from tracked patches in unlabelled video."""

__version__ = "0.1.0"
