"""Readers for the real on-disk dataset layouts, and the demo dataset generator."""
