"""Canonicalization passes: one form for each computation, no dead or repeated work."""
