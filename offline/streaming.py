"""Lazy, per-module loading of a Hugging Face safetensors checkpoint (for models larger than RAM).

`load_skeleton` builds the causal LM with empty (meta) parameters and loads only what lives
outside the decoder layers (embeddings, final norm, lm_head); `SafetensorsSource.load_module`
then materialises one decoder layer at a time through safe_open (memory-mapped reads). A
mixture-of-experts model's experts are unrolled on meta (sfmp_serve.experts), so each expert
projection is read from its own checkpoint tensor under the checkpoint's name
(ArchSpec.stored_key).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sfmp_serve.arch import ArchSpec
from sfmp_serve.errors import SFMPError
from sfmp_serve.experts import unroll_experts


HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                 "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsSource:
    """Which file holds each tensor of a checkpoint directory, and reads on demand."""

    def __init__(self, model_dir: str | os.PathLike, spec: ArchSpec | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.spec = spec  # translates the model's module names to the checkpoint's
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise SFMPError(f"{model_dir}: no *.safetensors files")
        self._where: dict[str, Path] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for f in files:
            with safe_open(f, framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = f
                    # The header says each dtype: nothing is read to learn it.
                    stored = handle.get_slice(key).get_dtype()
                    if stored in HEADER_DTYPES:
                        self._dtypes[key] = HEADER_DTYPES[stored]

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, one safe_open per file."""
        missing = [k for k in keys if k not in self._where]
        if missing:
            raise SFMPError(f"{self.model_dir}: tensor {missing[0]} not found in the checkpoint")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._where[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for f, names in by_file.items():
            with safe_open(f, framework="pt") as handle:
                for k in names:
                    out[k] = handle.get_tensor(k)
                    self._dtypes[k] = out[k].dtype
                    # Streamed weights are seen only here: the in-memory path's NaN/Inf check.
                    if out[k].is_floating_point() and not torch.isfinite(out[k]).all():
                        raise SFMPError(f"{f}: weight {k} contains NaN or Inf")
        return out

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of a tensor (read once if not seen yet)."""
        if key not in self._dtypes:
            self.read([key])
        return self._dtypes[key]

    def load_module(self, module: nn.Module, prefix: str, device: torch.device | str,
                    dtype: torch.dtype) -> None:
        """Materialise every parameter and persistent buffer of `module` (the model's module
        `prefix`) from the checkpoint, names translated by the spec (ArchSpec.stored_key)."""
        names = list(module.state_dict().keys())  # parameters and persistent buffers
        keys = {n: f"{prefix}.{n}" if prefix else n for n in names}
        if self.spec is not None:
            keys = {n: self.spec.stored_key(k) for n, k in keys.items()}
        tensors = self.read(list(keys.values()))
        state = {n: tensors[k].to(device, dtype if tensors[k].is_floating_point() else None)
                 for n, k in keys.items()}
        module.load_state_dict(state, strict=True, assign=True)


def load_skeleton(model_dir: str | os.PathLike, spec: ArchSpec,
                  dtype: torch.dtype = torch.float32) -> tuple[nn.Module, SafetensorsSource]:
    """The causal LM with meta decoder layers and real everything-else, plus its source."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) stay real
        model = AutoModelForCausalLM.from_config(config)
    unroll_experts(model, spec)
    source = SafetensorsSource(model_dir, spec)
    layers_prefix = spec.layers_path + "."
    outside = [n for n, p in model.named_parameters()
               if not n.startswith(layers_prefix) and n in source]
    state = {k: t.to(dtype) for k, t in source.read(outside).items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.is_meta and not name.startswith(layers_prefix):
            raise SFMPError(f"{model_dir}: tensor {name} not found in the checkpoint")
    return model.eval(), source
