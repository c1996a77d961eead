"""Test helpers that are not fixtures (also used by the benchmarks): a TCP proxy to cut."""
