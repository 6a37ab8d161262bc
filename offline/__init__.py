"""Offline SFMP pipeline: one stage per module, composable functions over one model.

calibration -> salience -> reorder -> allocation -> quantizers -> (bitplanes) -> export
`offline.pipeline` orchestrates; the math lives in the stage modules.
"""
