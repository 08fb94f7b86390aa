"""Benchmarks of evomerge (run as modules: python -m evomerge.experiments.benchmarks.<name>)."""
