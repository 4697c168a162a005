"""Pruning passes (placeholder, filled below)."""
