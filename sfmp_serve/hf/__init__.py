"""transformers integration: SFMPLinear, loading SFMP checkpoints, in-memory quantization.

Importing this package also registers "sfmp" with transformers' quantizer registry, so
`AutoModelForCausalLM.from_pretrained(sfmp_checkpoint)` works as well as `load_sfmp_model`.
"""

from sfmp_serve.hf.hf_quantizer import register_transformers
from sfmp_serve.hf.linear import DequantizedLinear, SFMPLinear, dequantize_linears, sfmp_matmul
from sfmp_serve.hf.loader import load_sfmp_model, quantize_in_memory

register_transformers()

__all__ = ["DequantizedLinear", "SFMPLinear", "dequantize_linears", "sfmp_matmul", "load_sfmp_model", "quantize_in_memory",
           "register_transformers"]
