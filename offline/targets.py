"""Quantization targets: what gets quantized, resolved once from the architecture table.

A target is one stored quantized linear: its weight view (the [out, in] weight of the module
called `name`), its input group (the targets that read one input tensor, so they share one
column order and one captured input), and its capture point (the module whose forward input is
the target's input: the linear itself for every family so far). Salience, reordering, the
layer-at-a-time engine, AWQ/GPTQ and export all work from a TargetSet; none of them looks for
nn.Linear modules by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from sfmp_serve.arch import ArchSpec
from sfmp_serve.errors import SFMPError


@dataclass(frozen=True)
class Target:
    name: str  # full module name: the checkpoint stores <name>.qweight, ...
    layer: int  # index of its decoder layer
    local: str  # module name inside the decoder layer
    capture: str  # module inside the decoder layer whose forward input is this target's input
    out_features: int
    in_features: int
    has_bias: bool

    def module(self, layer: nn.Module) -> nn.Module:
        """The module holding the weight, in `layer` (the target's decoder layer)."""
        return layer.get_submodule(self.local)

    def weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight view [out, in] (a Parameter: writes go to the model)."""
        return self.module(layer).weight


@dataclass(frozen=True)
class TargetSet:
    spec: ArchSpec
    targets: dict[str, Target]  # full name -> target, in model order
    groups: tuple[tuple[str, ...], ...]  # full names of the targets sharing one input, in order

    def __iter__(self) -> Iterator[Target]:
        return iter(self.targets.values())

    def __len__(self) -> int:
        return len(self.targets)

    def __contains__(self, name: object) -> bool:
        return name in self.targets

    def __getitem__(self, name: str) -> Target:
        return self.targets[name]

    def layer_prefix(self, index: int) -> str:
        return f"{self.spec.layers_path}.{index}"

    def layer_groups(self, index: int) -> list[list[Target]]:
        """The input groups of decoder layer `index`, in execution order."""
        prefix = self.layer_prefix(index) + "."
        return [[self.targets[n] for n in group] for group in self.groups
                if group[0].startswith(prefix)]

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full name -> weight view of every target in `model`."""
        return {t.name: model.get_submodule(t.name).weight for t in self}

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {t.name: (t.out_features, t.in_features) for t in self}


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    try:
        return model.get_submodule(spec.layers_path)
    except AttributeError as e:
        raise SFMPError(f"{type(model).__name__}: no decoder layers at '{spec.layers_path}': "
                        "the architecture table does not match this model") from e


def _module(layer: nn.Module, prefix: str, local: str, what: str) -> nn.Module:
    try:
        return layer.get_submodule(local)
    except AttributeError as e:
        raise SFMPError(f"{prefix}.{local}: no such {what} in {type(layer).__name__}: the "
                        "architecture table does not match this model") from e


def find_targets(model: nn.Module, spec: ArchSpec) -> TargetSet:
    """Every quantization target of `model` (layers may be on the meta device)."""
    targets: dict[str, Target] = {}
    groups: list[tuple[str, ...]] = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        prefix = f"{spec.layers_path}.{i}"
        for group in spec.input_groups:
            widths = set()
            for local in group:
                module = _module(layer, prefix, local, "linear")
                if not isinstance(module, nn.Linear):
                    raise SFMPError(f"{prefix}.{local}: expected a Linear, found "
                                    f"{type(module).__name__}")
                capture = spec.capture_of(local)
                _module(layer, prefix, capture, "input capture module")
                targets[f"{prefix}.{local}"] = Target(
                    f"{prefix}.{local}", i, local, capture, module.out_features,
                    module.in_features, module.bias is not None)
                widths.add(module.in_features)
            if len(widths) != 1:
                raise SFMPError(f"{prefix}: input group {list(group)} reads inputs of widths "
                                f"{sorted(widths)}: the architecture table does not match")
            groups.append(tuple(f"{prefix}.{local}" for local in group))
    if not targets:
        raise SFMPError(f"{type(model).__name__}: no decoder layers under '{spec.layers_path}'")
    return TargetSet(spec, targets, tuple(groups))
