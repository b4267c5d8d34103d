"""Quantization passes and the shared pieces they are built from.

- `grid`: the integer grid (bits, group size, symmetric or not) and round-to-nearest onto it;
- `layers`: which MatMul weights a pass may touch (exclude globs, lm_head, shared weights);
- `emit`: writing a quantized weight into the IR as standard DequantizeLinear -> MatMul.
"""
