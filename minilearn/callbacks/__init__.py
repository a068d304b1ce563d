"""Callbacks: one module per concern."""
