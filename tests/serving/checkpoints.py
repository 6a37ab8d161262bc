"""Tiny SFMP checkpoints for serving tests.

`make_checkpoint` uses the real offline pipeline (offline/pipeline.py). `make_random_checkpoint`
writes one directly through format.write_checkpoint: random block bits, codes min-max
quantized from the model's weights (so the model still behaves like itself), random
permutations shared within each input group; it tests the serving path independently of the
pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from sfmp_serve.arch import arch_for
from sfmp_serve.format import WEIGHTS_FILE, write_checkpoint
from tests.corrupt import resigned_copy
from tests.serving.packed import random_packed, sfmp_config
from tests.tiny import make_tiny_model


def make_checkpoint(model_dir: Path, out_dir: Path, bits: float = 3.0, group_size: int = 32,
                    block_rows: int = 16) -> Path:
    """The real pipeline at its default method: three levels {2,3,4}, data-free calibration kept
    tiny."""
    from offline.pipeline import QuantizeOptions, quantize_model, save_result
    options = QuantizeOptions(bits=bits, budget_gb=None, levels=3, bit_choices=(2, 3, 4),
                              group_size=group_size, block_rows=block_rows,
                              nsamples=4, seqlen=64)  # 256 tokens: GPTQ needs one per column
    save_result(quantize_model(model_dir, options), model_dir, out_dir, overwrite=True)
    return out_dir


def make_random_checkpoint(model_dir: Path, out_dir: Path, group_size: int = 32,
                           block_rows: int = 16, seed: int = 0) -> Path:
    hf_config = json.loads((model_dir / "config.json").read_text())
    spec = arch_for(hf_config["model_type"])
    weights = load_file(str(model_dir / WEIGHTS_FILE))
    generator = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.{lin}" for i in range(hf_config["num_hidden_layers"])
             for lin in spec.linears]
    config = sfmp_config(tuple(names), group_size, block_rows,
                         input_groups=spec.input_groups)
    tensors = {k: v for k, v in weights.items()
               if k.removesuffix(".weight") not in set(names)}
    bits = stored = count = 0
    for i in range(hf_config["num_hidden_layers"]):
        for group in spec.input_groups:
            w0 = weights[f"model.layers.{i}.{group[0]}.weight"]
            perm = torch.randperm(w0.shape[1], generator=generator)
            for lin in group:
                name = f"model.layers.{i}.{lin}"
                w = weights[f"{name}.weight"]
                packed = random_packed(w.shape[0], w.shape[1], config, generator, perm,
                                       weight=w.float())
                tensors.update(packed.to_tensors(name))
                geo = packed.geometry(config)
                bits += float((geo.block_words(packed.block_bits) * 32).sum())
                stored += packed.stored_bits()
                count += w.numel()
    config = sfmp_config(tuple(names), group_size, block_rows, input_groups=spec.input_groups)
    config = type(config)(**{**config.__dict__, "avg_bits": bits / count,
                             "bits_per_weight": stored / count})
    copies = [f for f in model_dir.iterdir()
              if f.is_file() and f.name not in ("config.json", WEIGHTS_FILE)]
    return write_checkpoint(out_dir, hf_config, config, tensors, copy_files=copies,
                            overwrite=True)


def make_serving_checkpoint(root: Path) -> Path:
    """A tiny Llama that vLLM's CPU attention accepts (head_dim 32; widths 96/200 are not
    multiples of 128), quantized by the offline pipeline with 2-, 3- and 4-bit blocks."""
    model = make_tiny_model(root / "model", "llama", heads=3, kv_heads=1)
    return make_checkpoint(model, root / "sfmp")


def corrupt_copy(checkpoint: Path, out: Path, name: str,
                 edit: Callable[[torch.Tensor], torch.Tensor]) -> Path:
    """A copy of `checkpoint` with tensor `name` replaced by edit(tensor), checksums recorded
    afresh (damage only the structural and value checks can catch)."""
    return resigned_copy(checkpoint, out, lambda t: t.update({name: edit(t[name])}))
