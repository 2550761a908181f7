"""Shared numerical operations (box maths)."""
