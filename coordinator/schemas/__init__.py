"""JSON schemas of the coordinator's machine-readable outputs (data files only)."""
