"""The hostile-input replay's cases, one module per surface (``bench_hostile.py`` runs them all)."""
