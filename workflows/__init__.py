"""Deterministic orchestration only: no I/O here, activities do the side effects."""
