"""Test SFMP checkpoints built without the offline pipeline.

Random block bit-widths and random permutations (shared within each input group, as the
format's users expect), min-max codes of the real weights so the quantized model still
resembles the original. Independent of offline/, so the loader is tested on its own.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sfmp_serve.arch import arch_for
from sfmp_serve.bitplanes import bcq_scales, pack_linear
from sfmp_serve.format import LayerGeometry, PackedLinear, SFMPConfig, write_checkpoint

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja")


@dataclass
class BuiltCheckpoint:
    path: Path
    config: SFMPConfig
    packed: dict[str, PackedLinear]


def minmax_packed(weight: torch.Tensor, geo: LayerGeometry, block_bits: torch.Tensor,
                  input_perm: torch.Tensor, output_perm: torch.Tensor,
                  act_dtype: torch.dtype) -> PackedLinear:
    """Asymmetric min-max codes of `weight` in the reordered order, packed."""
    wr = weight.float()[output_perm.long()][:, input_perm.long()]
    row_bits = block_bits.to(torch.int64).repeat_interleave(geo.rows(), dim=0)  # [N, G]
    codes = torch.empty(wr.shape, dtype=torch.uint8)
    scale = torch.empty(geo.out_features, geo.n_groups)
    zero = torch.empty_like(scale)
    c0 = 0
    for g, ncols in enumerate(geo.cols().tolist()):
        w = wr[:, c0:c0 + ncols]
        levels = (2.0 ** row_bits[:, g] - 1)[:, None]
        lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
        s = ((hi - lo) / levels).clamp(min=1e-8)
        z = torch.round(-lo / s).clamp(torch.zeros_like(levels), levels)
        codes[:, c0:c0 + ncols] = torch.clamp(torch.round(w / s) + z, torch.zeros_like(levels),
                                              levels).to(torch.uint8)
        scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        c0 += ncols
    qweight, offsets = pack_linear(codes, block_bits, geo)
    alpha, beta = bcq_scales(scale, zero, row_bits)
    return PackedLinear(qweight, alpha.to(act_dtype), beta.to(act_dtype), block_bits, offsets,
                        input_perm.to(torch.int32), output_perm.to(torch.int32))


def _pack_model(model, group_size: int, block_rows: int, bit_choices: tuple[int, ...],
                gen: torch.Generator) -> dict[str, PackedLinear]:
    spec = arch_for(model.config.model_type)
    packed: dict[str, PackedLinear] = {}
    choices = torch.tensor(bit_choices, dtype=torch.uint8)
    for i in range(model.config.num_hidden_layers):
        prefix = f"{spec.layers_path}.{i}"
        for group in spec.input_groups:
            k = model.get_submodule(f"{prefix}.{group[0]}").in_features
            input_perm = torch.randperm(k, generator=gen)
            for rel in group:
                linear = model.get_submodule(f"{prefix}.{rel}")
                geo = LayerGeometry(linear.out_features, k, group_size, block_rows)
                bits = choices[torch.randint(len(choices), (geo.n_block_rows, geo.n_groups),
                                             generator=gen)]
                output_perm = torch.randperm(linear.out_features, generator=gen)
                packed[f"{prefix}.{rel}"] = minmax_packed(linear.weight.detach(), geo, bits,
                                                          input_perm, output_perm, model.dtype)
    return packed


def make_sfmp_checkpoint(model_dir: str | Path, out_dir: str | Path, group_size: int = 32,
                         block_rows: int = 16, bit_choices: tuple[int, ...] = (2, 3, 4),
                         seed: int = 0) -> BuiltCheckpoint:
    """Quantize the HF model at `model_dir` with random bits/permutations into `out_dir`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    packed = _pack_model(model, group_size, block_rows, bit_choices,
                         torch.Generator().manual_seed(seed))
    n_weights = sum(p.out_features * p.in_features for p in packed.values())
    code_bits = 0
    for p in packed.values():
        geo = LayerGeometry(p.out_features, p.in_features, group_size, block_rows)
        code_bits += int((p.block_bits.to(torch.int64) * geo.rows()[:, None]
                          * geo.cols()[None, :]).sum())
    config = SFMPConfig(group_size=group_size, block_rows=block_rows,
                        bit_choices=tuple(bit_choices), avg_bits=code_bits / n_weights,
                        bits_per_weight=sum(p.stored_bits() for p in packed.values()) / n_weights,
                        act_dtype=str(model.dtype).removeprefix("torch."),
                        quantized_modules=tuple(packed),
                        input_groups=arch_for(model.config.model_type).input_groups)
    tensors = {k: v for k, v in model.state_dict().items()
               if k.removesuffix(".weight") not in packed}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, p in packed.items():
        tensors.update(p.to_tensors(name))
    hf_config = model.config.to_dict()
    copy = [Path(model_dir) / f for f in COPY_FILES if (Path(model_dir) / f).is_file()]
    path = write_checkpoint(out_dir, hf_config, config, tensors, copy_files=copy)
    return BuiltCheckpoint(path, config, packed)
