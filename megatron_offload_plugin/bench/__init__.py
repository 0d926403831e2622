"""Benchmarks that print JSON: real training runs side by side."""
