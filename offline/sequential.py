"""Layer-at-a-time quantization engine: every method (RTN, AWQ, GPTQ, ...) runs through it.

Lifecycle:
1. For a method that reads calibration inputs: one forward pass over the calibration sequences
   with every decoder layer replaced by a catcher that records what the layer receives (layer
   0's hidden states; every layer's keyword arguments, since rotary embeddings and masks differ
   between sliding-window and full-attention layers) and passes the hidden states on; the last
   catcher stops the forward pass.
2. For each decoder layer i, on `device` in float32:
   a. the method's `prepare_layer` (AWQ) gets the full-precision inputs of every target and
      may rewrite the layer (exact scale folding);
   b. input group by input group (offline.targets, in order), capture the group's input at its
      capture point with the layer's earlier groups already quantized ("true sequential"),
      quantize each target of the group in its reordered form, and put the dequantized weight
      back;
   c. run the quantized layer on the stored inputs: its outputs are the inputs of layer i+1.
`quantize_layers` yields each layer's result as it finishes (the pipeline packs and writes it
then), and can start at any layer given the hidden states entering it (a resumed run).
Peak memory is one layer plus the calibration activations. With `SafetensorsSource` the layer
weights are read lazily from the checkpoint (safe_open) and dropped afterwards, so a model
larger than RAM streams through. Methods that need no inputs (RTN) skip every forward pass.

Routed experts (mixture-of-experts layers, offline.targets) are captured where they run, so
each sees only the tokens routed to it; an expert that received fewer calibration tokens than
it has input columns (X^T X, on which GPTQ's Hessian and AWQ's searches rest, is then
rank-deficient) is quantized with round-to-nearest instead, with a warning giving the count,
and takes no part in AWQ's scale search.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from offline.quantizers.base import LinearContext, QuantizedCodes, Quantizer
from offline.quantizers.blockwise import LinearPlan, dequantize_codes, quantize_minmax
from offline.salience import resolve_device
from offline.streaming import SafetensorsSource
from offline.targets import Target, TargetSet, decoder_layers
from sfmp_serve.errors import SFMPError

log = logging.getLogger(__name__)

__all__ = ["LayerInputs", "LayerResult", "SequentialResult", "catch_layer_inputs",
           "capture_inputs", "decoder_layers", "make_plans", "materialised", "quantize_layers",
           "quantize_sequential", "run_layer"]


@dataclass
class SequentialResult:
    codes: dict[str, QuantizedCodes]  # full target name -> codes of its reordered weight (CPU)
    # Checkpoint names -> new values of parameters the method changed that are not the
    # weights of quantized targets (AWQ's folded norms; biases), in their original dtype.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is waste."""


@dataclass
class _Batches:
    """Calibration activations entering one layer: per batch hidden states and layer kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


@dataclass
class LayerInputs:
    """What the decoder layers receive on the calibration batches: the hidden states entering
    layer 0 and the keyword arguments of every layer (tensors shared between layers stored
    once)."""

    hidden: list[torch.Tensor]  # per batch
    kwargs: list[list[dict[str, Any]]]  # per layer, per batch

    def at(self, index: int, hidden: list[torch.Tensor]) -> _Batches:
        """The inputs of layer `index` when `hidden` enters it."""
        return _Batches(hidden, self.kwargs[index])


def _to(obj: Any, device: torch.device, memo: dict[int, tuple[Any, Any]] | None = None) -> Any:
    """Move tensors inside nested tuples/lists/dicts to device; floating ones to float32. A
    tensor seen before (in `memo`) maps to the same copy, so layers share their masks."""
    if isinstance(obj, torch.Tensor):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)][1]
        moved = obj.to(device, torch.float32 if obj.is_floating_point() else obj.dtype)
        if memo is not None:
            memo[id(obj)] = (obj, moved)  # keeps obj alive, so its id is not reused
        return moved
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


@contextmanager
def swapped_layers(model: nn.Module, layers_path: str, new: nn.ModuleList) -> Iterator[None]:
    """The model runs `new` instead of its decoder layers inside the block."""
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    try:
        yield
    finally:
        setattr(parent, attr, old)


class _Catcher(nn.Module):
    """Stands in for decoder layer `index`: records its inputs, passes the hidden states on."""

    def __init__(self, index: int, count: int, caught: LayerInputs, device: torch.device,
                 memo: dict[int, tuple[Any, Any]]) -> None:
        super().__init__()
        self.index, self.count, self.caught, self.device, self.memo = (index, count, caught,
                                                                       device, memo)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.caught.hidden.append(_to(hidden, self.device))
        self.caught.kwargs[self.index].append(_to(dict(kwargs), self.device, self.memo))
        if self.index == self.count - 1:
            raise _StopForward
        return hidden


@torch.no_grad()
def catch_layer_inputs(model: nn.Module, layers_path: str, input_ids: torch.Tensor,
                       batch_size: int, device: torch.device) -> LayerInputs:
    """Run the model over the calibration batches with its decoder layers replaced by catchers
    (the layers themselves are not touched, so they may be on meta) and keep what each layer
    receives, moved to `device`."""
    count = len(model.get_submodule(layers_path))
    caught = LayerInputs([], [[] for _ in range(count)])
    embed_device = model.get_input_embeddings().weight.device
    for ids in input_ids.split(batch_size):
        memo: dict[int, tuple[Any, Any]] = {}
        catchers = nn.ModuleList(_Catcher(i, count, caught, device, memo) for i in range(count))
        with swapped_layers(model, layers_path, catchers):
            try:
                model(input_ids=ids.to(embed_device), use_cache=False)
            except _StopForward:
                pass
    return caught


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(layer: nn.Module, batches: _Batches, names: list[str],
                   stop: bool = True) -> dict[str, torch.Tensor]:
    """Inputs [T, K] of the named modules over all batches (forward stops after the last).
    A module that never ran (a routed expert no token reached) is absent from the result."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    pending: set[str] = set()

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            seen[name].append(args[0].reshape(-1, args[0].shape[-1]).to(torch.float32))
            pending.discard(name)
            if stop and not pending:
                raise _StopForward
        return hook

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        for hidden, kwargs in zip(batches.hidden, batches.kwargs):
            pending.update(names)
            try:
                layer(hidden, **kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items() if v}


@torch.no_grad()
def run_layer(layer: nn.Module, batches: _Batches) -> list[torch.Tensor]:
    """Outputs of the layer on every batch: the hidden states entering the next layer."""
    return [_layer_output(layer(h, **kw)) for h, kw in zip(batches.hidden, batches.kwargs)]


def too_few_tokens(target: Target, inputs: torch.Tensor | None) -> bool:
    """A routed expert whose calibration tokens cannot support a calibrated method (fewer
    than its input columns): it falls back to round-to-nearest."""
    return target.expert is not None and (inputs is None or inputs.shape[0] < target.in_features)


def _quantize_group(layer: nn.Module, group: list[Target], plans: Mapping[str, LinearPlan],
                    quantizer: Quantizer, inputs: torch.Tensor | None,
                    calibrated: bool = False) -> dict[str, QuantizedCodes]:
    """Quantize the targets of one input group and write their dequantized weights back.
    calibrated: the method reads inputs (`inputs` None then means no token reached them)."""
    out: dict[str, QuantizedCodes] = {}
    reordered: tuple[torch.Tensor, torch.Tensor] | None = None  # (perm, inputs[:, perm])
    for target in group:
        plan = plans[target.name]
        weight = target.weight(layer)
        context = LinearContext(name=target.name)
        fallback = calibrated and too_few_tokens(target, inputs)
        if fallback and target is group[0]:  # one line per input group (gate+up, down)
            log.warning("layer %s: routed %d calibration tokens, fewer than its %d inputs: "
                        "quantized with RTN instead of %s", ", ".join(t.name for t in group),
                        0 if inputs is None else inputs.shape[0], target.in_features,
                        quantizer.name)
        if not fallback and inputs is not None:
            # Targets of a group share one input order: reorder (and let GPTQ hash) once.
            if reordered is None or not torch.equal(reordered[0], plan.input_perm):
                reordered = (plan.input_perm, plan.reorder_inputs(inputs))
            context = LinearContext(inputs=reordered[1], name=target.name)
        weight_r = plan.reorder(weight.to(torch.float32))
        try:
            codes = (quantize_minmax(weight_r, plan.block_bits, plan.geometry) if fallback else
                     quantizer.quantize(weight_r, plan.block_bits, plan.geometry, context))
        except SFMPError as e:
            raise SFMPError(f"layer {target.name}: {e}") from e
        deq = plan.restore(dequantize_codes(codes, plan.geometry))
        weight.data.copy_(deq.to(weight.dtype))
        out[target.name] = QuantizedCodes(codes.codes.cpu(), codes.scale.cpu(),
                                          codes.zero.cpu())
    return out


def _prepares(quantizer: Quantizer) -> bool:
    """Does the method rewrite layers (so it needs every target's full-precision input)?"""
    return type(quantizer).prepare_layer is not Quantizer.prepare_layer


def _quantize_layer(layer: nn.Module, index: int, targets: TargetSet,
                    plans: Mapping[str, LinearPlan], quantizer: Quantizer,
                    batches: _Batches | None) -> tuple[dict[str, QuantizedCodes], list[str]]:
    """Steps 2a and 2b for one layer on its device; returns codes and changed parameter names."""
    groups = [[t for t in group if t.name in plans] for group in targets.layer_groups(index)]
    groups = [group for group in groups if group]
    planned = [t for group in groups for t in group]
    changed: list[str] = []
    if batches is not None and _prepares(quantizer):
        captured = capture_inputs(layer, batches, list(dict.fromkeys(t.capture
                                                                     for t in planned)))
        fp_inputs = {t.local: captured[t.capture] for t in planned
                     if not too_few_tokens(t, captured.get(t.capture))}
        local = {t.local: plans[t.name] for t in planned}
        changed = quantizer.prepare_layer(layer, targets.spec, local, fp_inputs,
                                          targets.layer_prefix(index))
        del captured, fp_inputs
    codes: dict[str, QuantizedCodes] = {}
    for group in groups:
        inputs = None
        if batches is not None:
            inputs = capture_inputs(layer, batches, [group[0].capture]).get(group[0].capture)
        codes.update(_quantize_group(layer, group, plans, quantizer, inputs,
                                     batches is not None))
    return codes, changed


@dataclass
class LayerResult:
    """What quantizing one decoder layer produced."""

    index: int
    codes: dict[str, QuantizedCodes]  # full target name -> codes of its reordered weight (CPU)
    # Checkpoint names -> new values (float32, CPU) of parameters the method changed that
    # are not weights of quantized targets (AWQ's folded norms and routers; biases).
    tensors: dict[str, torch.Tensor]
    # The quantized layer's outputs on the calibration batches: the inputs of layer index + 1
    # (None for methods without inputs). A resumed run starts from them.
    hidden: list[torch.Tensor] | None


def quantize_layers(model: nn.Module, targets: TargetSet, plans: Mapping[str, LinearPlan],
                    quantizer: Quantizer, input_ids: torch.Tensor | None = None,
                    device: str = "cpu", batch_size: int = 4,
                    source: SafetensorsSource | None = None, start: int = 0,
                    hidden: list[torch.Tensor] | None = None) -> Iterator[LayerResult]:
    """Quantize every planned target (full names) of `model`, one decoder layer at a time,
    yielding each layer's result as soon as it is done (its weights already dropped when
    streamed), so a consumer can write it and memory does not grow with the layers done.

    input_ids [n, seqlen]: calibration sequences (needed when the quantizer has needs_inputs).
    start, hidden: continue at layer `start`, whose calibration inputs are `hidden` (a
    LayerResult.hidden of layer start - 1); earlier layers are not touched.
    The model is modified in place: quantized targets hold their dequantized weights, AWQ's
    folds are applied. With `source`, layer weights are loaded from it and dropped afterwards
    (the model's layers may live on the meta device).
    """
    dev = resolve_device(device)
    if quantizer.needs_inputs and input_ids is None:
        raise SFMPError(f"method {quantizer.name} needs calibration data")
    layers = decoder_layers(model, targets.spec)
    captured = (catch_layer_inputs(model, targets.spec.layers_path, input_ids, batch_size, dev)
                if quantizer.needs_inputs else None)
    if captured is not None:
        if start and hidden is None:
            raise ValueError(f"starting at layer {start} needs the hidden states entering it")
        hidden = captured.hidden if not start else [h.to(dev) for h in hidden]
    bar = tqdm(range(start, len(layers)), desc=f"quantize ({quantizer.name})", unit="layer",
               initial=start, total=len(layers))
    for i in bar:
        layer, prefix = layers[i], targets.layer_prefix(i)
        home_dtype = next(layer.parameters()).dtype
        batches = captured.at(i, hidden) if captured is not None else None
        tensors = {}
        with materialised(layer, prefix, dev, source):
            codes, changed = _quantize_layer(layer, i, targets, plans, quantizer, batches)
            quantized = {targets[name].local + ".weight" for name in codes}
            for name in sorted(set(changed) - quantized):
                key = targets.spec.stored_key(f"{prefix}.{name}")
                tensors[key] = layer.get_parameter(name).detach().to(
                    "cpu", home_dtype if source is None else source.dtype(key))
            if batches is not None:
                hidden = run_layer(layer, batches)
        yield LayerResult(i, codes, tensors, hidden if batches is not None else None)


def quantize_sequential(model: nn.Module, targets: TargetSet, plans: Mapping[str, LinearPlan],
                        quantizer: Quantizer, input_ids: torch.Tensor | None = None,
                        device: str = "cpu", batch_size: int = 4,
                        source: SafetensorsSource | None = None) -> SequentialResult:
    """quantize_layers over every layer, collected (codes of every layer held at once)."""
    start = time.perf_counter()
    result = SequentialResult(codes={})
    for layer in quantize_layers(model, targets, plans, quantizer, input_ids, device,
                                 batch_size, source):
        result.codes.update(layer.codes)
        result.tensors.update(layer.tensors)
    result.seconds = time.perf_counter() - start
    return result


@contextmanager
def materialised(layer: nn.Module, prefix: str, device: torch.device,
                 source: SafetensorsSource | None) -> Iterator[nn.Module]:
    """The layer materialised in float32 on device for the block, then put back (or dropped)."""
    param = next(layer.parameters())
    home = (param.device, param.dtype)
    if source is not None:
        source.load_module(layer, prefix, device, torch.float32)
    else:
        layer.to(device, torch.float32)
    try:
        yield layer
    finally:
        # Streamed weights are dropped again: one decoder layer in memory at a time.
        layer.to("meta") if source is not None else layer.to(*home)


def make_plans(orders: Mapping[str, Any], block_bits: Mapping[str, torch.Tensor],
               geometries: Mapping[str, Any]) -> dict[str, LinearPlan]:
    """LinearPlans from the pipeline's per-linear orders (input_perm/output_perm), bit tables
    and geometries. Linears that share one input permutation object keep sharing it."""
    longs: dict[int, torch.Tensor] = {}

    def as_long(perm: torch.Tensor) -> torch.Tensor:
        return longs.setdefault(id(perm), perm.to(torch.int64))

    return {name: LinearPlan(as_long(order.input_perm), as_long(order.output_perm),
                             block_bits[name], geometries[name])
            for name, order in orders.items()}
