"""Helpers for tests and tools: tiny random-weight checkpoints built offline."""
