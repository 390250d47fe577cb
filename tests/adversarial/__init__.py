"""Hostile peers against the real servers."""
