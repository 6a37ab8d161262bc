"""vLLM integration: the "sfmp" quantization method (registered by plugin.register)."""
