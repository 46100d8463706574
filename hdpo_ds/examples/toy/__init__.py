"""Toy tasks for reproducing results at small scale on CPU (docs/results.md)."""
