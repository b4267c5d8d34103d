"""Measuring what compression costs in accuracy: embedding fidelity (MiniLM), perplexity (the
tiny trained LM), and the calibration/evaluation texts they use."""
