"""sfmp-serve: SFMP mixed-precision checkpoints, their reference op and their vLLM serving.

    import sfmp_serve
    sfmp_serve.quantize("models/llama", sfmp_serve.Recipe(bits=3.25, method="gptq"),
                        out="llama-sfmp")

`quantize` and the recipe types are imported on first use: the vLLM plugin imports this
package in every vLLM process and must stay light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Block", "Calibration", "Method", "Overrides", "QuantizeSummary", "Recipe",
           "quantize"]

_LAZY = {"quantize": "sfmp_serve.api", "QuantizeSummary": "sfmp_serve.api",
         "Recipe": "sfmp_serve.recipe", "Block": "sfmp_serve.recipe",
         "Method": "sfmp_serve.recipe", "Calibration": "sfmp_serve.recipe",
         "Overrides": "sfmp_serve.recipe"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sfmp_serve' has no attribute {name!r}")
