"""Reference data shipped with the coordinator: hardware catalog, published measurements and
calibration constants (CSV files, each row with its source)."""
