"""Measuring what compression costs in accuracy."""
