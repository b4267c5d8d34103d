"""Execution: the reference runtime's plan, backends, compiled models and saved artifacts."""
