"""A/B experiments: their config, the hash buckets that assign a request, the per-variant statistics and
shadow comparisons, and the registry that routes requests and changes experiments at run time."""
