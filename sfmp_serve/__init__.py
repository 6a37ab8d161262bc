"""sfmp-serve: SFMP mixed-precision checkpoints, their reference op and their vLLM serving."""

__version__ = "0.1.0"
