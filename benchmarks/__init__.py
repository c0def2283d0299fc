"""Benchmarks for hive-ratelimit; run them all with ``python benchmarks/run.py``."""
