"""Benchmarks (importable; the `haps bench ...` commands call these)."""
