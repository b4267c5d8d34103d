"""Calibration: running sample inputs through the model, block by block, to collect the
statistics compression passes need (Hessians, activation magnitudes, input samples)."""
