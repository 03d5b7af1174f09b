"""Benchmarks and load tests for git-gateway (run from the repository root)."""
