"""melt-bench: what looped LMs cost in memory and time, and what they score (Ouro vs MELT)."""

__version__ = "0.1.0"
