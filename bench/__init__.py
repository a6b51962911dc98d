"""Benchmarks and the training CLI, run as scripts (python bench/<name>.py); see docs/benchmarks.md."""
