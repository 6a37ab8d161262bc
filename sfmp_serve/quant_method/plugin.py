"""vLLM general plugin (entry point vllm.general_plugins: sfmp): registers the "sfmp" method.

vLLM calls `register` in the API server, the engine core and every worker, so it must be
idempotent. After it, `--quantization sfmp` works and checkpoints whose config.json has
quantization_config.quant_method == "sfmp" are detected without the flag.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from sfmp_serve.format import QUANT_METHOD
    from sfmp_serve.ops import api  # noqa: F401  (defines torch.ops.sfmp.linear)
    from sfmp_serve.quant_method.config import SFMPQuantConfig

    register_quantization_config(QUANT_METHOD)(SFMPQuantConfig)
    _registered = True
    logger.debug("registered vLLM quantization method %r", QUANT_METHOD)
