"""Benchmark cases, one module per op family (see pyfici.bench)."""
