"""Metrics and human-readable reports."""
