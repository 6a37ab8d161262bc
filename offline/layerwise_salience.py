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
activations in float32.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from offline.salience import resolve_device
from offline.sequential import (_Batches, _layer_output, catch_layer0_inputs, decoder_layers,
                                materialised, run_layer)
from offline.streaming import SafetensorsSource
from sfmp_serve.arch import ArchSpec
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


def head_gradients(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor,
                   last: _Batches, device: torch.device) -> list[torch.Tensor]:
    """d loss / d h_L per sequence, through the model's own head and loss function."""
    parent_path, _, attr = spec.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers = getattr(parent, attr)
    grads = []
    try:
        for ids, hidden in zip(input_ids.split(1), last.hidden):
            leaf = hidden.detach().requires_grad_(True)
            setattr(parent, attr, nn.ModuleList([_Replay(leaf)]))
            ids = ids.to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            grads.append(leaf.grad)
    finally:
        setattr(parent, attr, layers)
    return grads


def layerwise_fisher(model: nn.Module, spec: ArchSpec, linears: list[str],
                     input_ids: torch.Tensor, device: str = "cpu",
                     source: SafetensorsSource | None = None) -> dict[str, torch.Tensor]:
    """Fisher diagonal (float32 CPU [out, in]) of the named linears (full module names).

    Everything outside the decoder layers must be materialised on `device` in float32; the
    layers may be on meta when `source` is given.
    """
    dev = resolve_device(device)
    layers = decoder_layers(model, spec)
    fisher: dict[str, torch.Tensor] = {}
    with _frozen(model), torch.enable_grad():
        with torch.no_grad():
            boundary = [catch_layer0_inputs(model, layers, input_ids, 1, dev)]
            for i, layer in enumerate(tqdm(layers, desc="salience forward", unit="layer")):
                with materialised(layer, f"{spec.layers_path}.{i}", dev, source):
                    boundary.append(run_layer(layer, boundary[-1]))
        grads = head_gradients(model, spec, input_ids, boundary.pop(), dev)
        for i in tqdm(reversed(range(len(layers))), total=len(layers),
                      desc="salience backward", unit="layer"):
            prefix = f"{spec.layers_path}.{i}"
            with materialised(layers[i], prefix, dev, source) as layer:
                grads = _layer_backward(layer, prefix, linears, boundary.pop(), grads, fisher)
    for name, f in fisher.items():
        if not torch.isfinite(f).all():
            raise SFMPError(f"salience of {name} contains NaN or Inf (the loss or its "
                            "gradient overflowed on the calibration data)")
    return fisher


def _layer_backward(layer: nn.Module, prefix: str, linears: list[str], inputs: _Batches,
                    grads: list[torch.Tensor], fisher: dict[str, torch.Tensor],
                    ) -> list[torch.Tensor]:
    """Accumulate the squared weight gradients of one layer; return the input gradients."""
    weights = {n: layer.get_submodule(n[len(prefix) + 1:]).weight for n in linears
               if n.startswith(prefix + ".")}
    for w in weights.values():
        w.requires_grad_(True)
    below = []
    for hidden, kwargs, grad in zip(inputs.hidden, inputs.kwargs, grads):
        x = hidden.detach().requires_grad_(True)
        _layer_output(layer(x, **kwargs)).backward(grad)
        for name, w in weights.items():
            acc = fisher.setdefault(name, torch.zeros(w.shape, dtype=torch.float32))
            acc.add_((w.grad * w.grad).cpu())
            w.grad = None
        below.append(x.grad)
    for w in weights.values():
        w.requires_grad_(False)
    return below
