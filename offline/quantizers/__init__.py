"""Quantization methods: one module per method, each a `Quantizer` registered with
`base.register` (found by `base.methods()`); blockwise.py holds the math they share."""
