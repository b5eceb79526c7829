"""Benchmark plugins, one module per protocol."""
