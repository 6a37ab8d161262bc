"""What an SFMP checkpoint must hold for the model its config.json describes.

One definition for every reader: `load_sfmp_model`, `from_pretrained` (the registered
quantizer) and the serving pre-check (`sfmp serve`, and the vLLM plugin before vLLM loads
anything: vLLM's own loader does not insist on completeness for quantized models, and would
serve a model whose final norm is missing). The model is built on the meta device
(model_dir.empty_model), so the check costs no memory: every quantized linear exists with the
stored shape and bias, every other parameter is stored at its shape, and nothing is stored that
the model does not have. Names are the checkpoint's; a mixture-of-experts model has its experts
unrolled into one linear per expert and projection (sfmp_serve.experts), as they are stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from sfmp_serve.errors import FormatError
from sfmp_serve.format import TENSOR_SUFFIXES, SFMPConfig
from sfmp_serve.hf.linear import check_bias, find_linear
from sfmp_serve.model_dir import check_stored, empty_model

__all__ = ["check_complete", "empty_model"]


def check_complete(model: nn.Module, config: SFMPConfig, stored: Mapping[str, Sequence[int]],
                   files: Mapping[str, Path], path: Path) -> dict[str, tuple[int, int]]:
    """Check the stored tensors' names and shapes (`stored`, held in `files`, of the checkpoint
    at `path`) against `model`; returns the [out, in] shape of every quantized linear (for
    PackedLinear.validate). FormatError names file and tensor."""
    shapes = {}
    skip = set()
    for name in config.quantized_modules:
        linear = find_linear(model, name)
        check_bias(name, linear, f"{name}.bias" in stored)
        shapes[name] = (linear.out_features, linear.in_features)
        skip.update({f"{name}.weight", f"{name}.bias"})
    quantized = set(config.quantized_modules)
    plain = {}
    for key, shape in stored.items():
        owner, _, suffix = key.rpartition(".")
        if owner not in quantized:
            plain[key] = shape
        elif suffix not in (*TENSOR_SUFFIXES, "bias"):
            raise FormatError(f"layer {owner}: {files.get(key, path)}: tensor {key}: unknown "
                              f"SFMP tensor (expected {', '.join((*TENSOR_SUFFIXES, 'bias'))})")
    check_stored(model, plain, files, path, skip)
    return shapes
