"""Fisher salience one decoder layer at a time (the same numbers as offline.salience, streamed).

The diagonal Fisher needs d loss / d W for every sequence, i.e. a backward pass through the
whole model. Done layer by layer it is gradient checkpointing at layer boundaries:
1. forward, layer by layer, keeping every layer's input for every sequence (activations only);
2. the head (final norm, lm_head, the model's own LM loss) on the last hidden states gives
   d loss / d h_L per sequence;
3. backward, layer by layer from the top: recompute the layer on its stored input, back-propagate
   the output gradient, add each weight gradient's square to the Fisher, pass the input
   gradient down. Each sequence is its own backward pass, so squares are per sample.
Only one layer's weights are materialised at a time (with a SafetensorsSource each layer is read
twice: once going up, once coming down); memory is one layer plus (layers + 1) x tokens x hidden
activations in float32, plus the Fisher of every layer unless the caller reduces each layer's
as it completes (`on_layer`: the pipeline keeps only orders and block importance).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from offline.salience import resolve_device
from offline.sequential import (_Batches, _layer_output, catch_layer_inputs, materialised,
                                run_layer, swapped_layers)
from offline.streaming import SafetensorsSource
from offline.targets import TargetSet, decoder_layers
from sfmp_serve.errors import SFMPError


class _Replay(nn.Module):
    """Stands in for the decoder layers: returns stored last hidden states (a grad leaf)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def head_gradients(model: nn.Module, layers_path: str, input_ids: torch.Tensor,
                   last: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """d loss / d h_L per sequence, through the model's own head and loss function."""
    grads = []
    for ids, hidden in zip(input_ids.split(1), last):
        leaf = hidden.detach().requires_grad_(True)
        with swapped_layers(model, layers_path, nn.ModuleList([_Replay(leaf)])):
            ids = ids.to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append(leaf.grad)
    return grads


def layerwise_fisher(model: nn.Module, targets: TargetSet, input_ids: torch.Tensor,
                     device: str = "cpu", source: SafetensorsSource | None = None,
                     on_layer: Callable[[dict[str, torch.Tensor]], None] | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Fisher diagonal (float32 CPU [out, in]) of every target's weight (full names).

    Everything outside the decoder layers must be materialised on `device` in float32; the
    layers may be on meta when `source` is given. on_layer: called with each layer's Fisher as
    soon as it is complete (top layer first), which is then not kept: what the caller derives
    from it (orders, block importance) is all that stays, so memory does not grow with the
    layers done (the returned dict is then empty).
    """
    dev = resolve_device(device)
    spec = targets.spec
    layers = decoder_layers(model, spec)
    fisher: dict[str, torch.Tensor] = {}
    with _frozen(model), torch.enable_grad():
        with torch.no_grad():
            caught = catch_layer_inputs(model, spec.layers_path, input_ids, 1, dev)
            boundary = [caught.hidden]
            for i, layer in enumerate(tqdm(layers, desc="salience forward", unit="layer")):
                with materialised(layer, targets.layer_prefix(i), dev, source):
                    boundary.append(run_layer(layer, caught.at(i, boundary[-1])))
        grads = head_gradients(model, spec.layers_path, input_ids, boundary.pop(), dev)
        for i in tqdm(reversed(range(len(layers))), total=len(layers),
                      desc="salience backward", unit="layer"):
            with materialised(layers[i], targets.layer_prefix(i), dev, source) as layer:
                weights = {t.name: t.weight(layer) for group in targets.layer_groups(i)
                           for t in group}
                grads = _layer_backward(layer, weights, caught.at(i, boundary.pop()), grads,
                                        fisher)
            _check_finite({n: fisher[n] for n in weights})
            if on_layer is not None:
                on_layer({n: fisher.pop(n) for n in weights})
    return fisher


def _check_finite(fisher: dict[str, torch.Tensor]) -> None:
    for name, f in fisher.items():
        if not torch.isfinite(f).all():
            raise SFMPError(f"salience of {name} contains NaN or Inf (the loss or its "
                            "gradient overflowed on the calibration data)")


def _layer_backward(layer: nn.Module, weights: dict[str, torch.Tensor], inputs: _Batches,
                    grads: list[torch.Tensor], fisher: dict[str, torch.Tensor],
                    ) -> list[torch.Tensor]:
    """Accumulate the squared weight gradients of one layer; return the input gradients."""
    for w in weights.values():
        w.requires_grad_(True)
    below = []
    for hidden, kwargs, grad in zip(inputs.hidden, inputs.kwargs, grads):
        x = hidden.detach().requires_grad_(True)
        _layer_output(layer(x, **kwargs)).backward(grad)
        for name, w in weights.items():
            acc = fisher.setdefault(name, torch.zeros(w.shape, dtype=torch.float32))
            if w.grad is not None:  # None: an expert no token of this sequence reached
                acc.add_((w.grad * w.grad).cpu())
            w.grad = None
        below.append(x.grad)
    for w in weights.values():
        w.requires_grad_(False)
    return below
