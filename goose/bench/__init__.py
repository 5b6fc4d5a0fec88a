"""Benchmarks (run through the goose CLI)."""
