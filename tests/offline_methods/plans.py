"""Random but valid SFMP plans (shared input orders per group, mixed block bits) for tests."""

from __future__ import annotations

import torch
from torch import nn

from offline.quantizers.blockwise import LinearPlan
from sfmp_serve.arch import ArchSpec
from sfmp_serve.format import LayerGeometry


def random_plans(model: nn.Module, spec: ArchSpec, group_size: int = 32, block_rows: int = 16,
                 bits: tuple[int, ...] = (2, 3, 4), seed: int = 0) -> dict[str, LinearPlan]:
    g = torch.Generator().manual_seed(seed)
    layers = model.get_submodule(spec.layers_path)
    plans = {}
    choices = torch.tensor(bits, dtype=torch.uint8)
    for i, layer in enumerate(layers):
        for group in spec.input_groups:
            k = layer.get_submodule(group[0]).in_features
            input_perm = torch.randperm(k, generator=g)
            for name in group:
                n = layer.get_submodule(name).out_features
                geo = LayerGeometry(n, k, group_size, block_rows)
                idx = torch.randint(len(bits), (geo.n_block_rows, geo.n_groups), generator=g)
                plans[f"{spec.layers_path}.{i}.{name}"] = LinearPlan(
                    input_perm, torch.randperm(n, generator=g), choices[idx], geo)
    return plans


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with strongly correlated channels and a few large ones (like real LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(tokens, k, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)
    x[:, :4] *= 8.0
    return x
