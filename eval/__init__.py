"""Metrics, evaluations, benchmarks and reports."""
