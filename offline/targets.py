"""Quantization targets: what gets quantized, resolved once from the architecture table.

A target is one stored quantized linear: its weight view (the [out, in] weight of the module
`local` of its decoder layer), its input group (the targets that read one input tensor, so they
share one column order and one captured input), and its capture point (the module whose forward
input is the target's input: the linear itself for every family so far). Salience, reordering,
the layer-at-a-time engine, AWQ/GPTQ and export all work from a TargetSet; none of them looks
for nn.Linear modules by name.

Mixture-of-experts layers (sfmp_serve.arch MoESpec) are resolved per decoder layer: their
experts, unrolled into one linear per expert and projection (sfmp_serve.experts), are targets
whose input is the tokens routed to them (`expert` says which). A target's `name` is the
checkpoint's (Mixtral: model.layers.0.block_sparse_moe.experts.3.w1), `local` the model's
module inside the layer (mlp.experts.3.w1).
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
    expert: int | None = None  # the routed expert this linear belongs to

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

    def module_path(self, target: Target) -> str:
        """The target's module in the model (its name there, not in the checkpoint)."""
        return f"{self.layer_prefix(target.layer)}.{target.local}"

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full name -> weight view of every target in `model`."""
        return {t.name: model.get_submodule(self.module_path(t)).weight for t in self}

    def relative_groups(self) -> tuple[tuple[str, ...], ...]:
        """Every distinct input group relative to its decoder layer, checkpoint names, in
        model order (what quantization_config.input_groups records)."""
        seen: dict[tuple[str, ...], None] = {}
        for group in self.groups:
            prefix = self.layer_prefix(self.targets[group[0]].layer) + "."
            seen.setdefault(tuple(n[len(prefix):] for n in group), None)
        return tuple(seen)

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
    """Every quantization target of `model` (layers may be on the meta device; a MoE model's
    experts must be unrolled first, sfmp_serve.experts.unroll_experts)."""
    targets: dict[str, Target] = {}
    groups: list[tuple[str, ...]] = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        prefix = f"{spec.layers_path}.{i}"
        names = []
        for group in spec.layer_groups(layer):
            widths = set()
            for local in group:
                module = _module(layer, prefix, local, "linear")
                if not isinstance(module, nn.Linear):
                    raise SFMPError(f"{prefix}.{local}: expected a Linear, found "
                                    f"{type(module).__name__}")
                capture = spec.capture_of(local)
                _module(layer, prefix, capture, "input capture module")
                name = spec.stored_key(f"{prefix}.{local}")
                targets[name] = Target(
                    name, i, local, capture, module.out_features, module.in_features,
                    module.bias is not None, spec.moe.expert_of(local) if spec.moe else None)
                widths.add(module.in_features)
                names.append(name)
            if len(widths) != 1:
                raise SFMPError(f"{prefix}: input group {list(group)} reads inputs of widths "
                                f"{sorted(widths)}: the architecture table does not match")
            groups.append(tuple(names[-len(group):]))
    if not targets:
        raise SFMPError(f"{type(model).__name__}: no decoder layers under '{spec.layers_path}'")
    return TargetSet(spec, targets, tuple(groups))
