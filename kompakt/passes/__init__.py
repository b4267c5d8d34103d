"""Passes: the `Pass` base, registry, pipeline strings, the PassManager and the passes."""
