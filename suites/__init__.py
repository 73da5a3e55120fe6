"""Shipped sweep definitions (YAML); `melt-bench --suite NAME` finds them here."""
