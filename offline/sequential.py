"""Layer-at-a-time quantization engine (the calibrated methods, AWQ and GPTQ, run through it).

Lifecycle:
1. Catch the inputs of decoder layer 0 (hidden states and the layer's keyword arguments:
   rotary embeddings, mask) on the calibration sequences, with a pre-hook that stops the
   forward pass there.
2. For each decoder layer i, on `device` in float32:
   a. a method with `prepare_layer` (AWQ) gets the full-precision inputs of every linear and
      may rewrite the layer (exact scale folding);
   b. input group by input group (arch `input_groups`, in order), capture the group's input
      with the layers' earlier groups already quantized ("true sequential"), quantize each
      linear of the group in its reordered form, and put the dequantized weight back;
   c. run the quantized layer on the stored inputs: its outputs are the inputs of layer i+1.
Peak memory is one layer plus the calibration activations. With `SafetensorsSource` the layer
weights are read lazily from the checkpoint (safe_open) and dropped afterwards, so a model
larger than RAM streams through. Methods that need no inputs (RTN) skip every forward pass.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from offline.quantizers.base import LinearContext, QuantizedCodes, Quantizer
from offline.quantizers.blockwise import LinearPlan, dequantize_codes
from offline.salience import resolve_device
from offline.streaming import SafetensorsSource
from sfmp_serve.arch import ArchSpec
from sfmp_serve.errors import SFMPError

log = logging.getLogger(__name__)


@runtime_checkable
class LayerPreparer(Protocol):
    """A method that rewrites a full-precision decoder layer before it is quantized (AWQ)."""

    def prepare_layer(self, layer: nn.Module, spec: ArchSpec, plans: Mapping[str, LinearPlan],
                      inputs: Mapping[str, torch.Tensor], layer_name: str = "") -> list[str]:
        ...


@dataclass
class SequentialResult:
    codes: dict[str, QuantizedCodes]  # full linear name -> codes of its reordered weight (CPU)
    # Full state-dict names -> new values of parameters the method changed that are not the
    # weights of quantized linears (AWQ's folded norms; biases), in their original dtype.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is waste."""


@dataclass
class _Batches:
    """Calibration activations at one layer boundary: per batch hidden states and layer kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


def _to(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to device; floating ones to float32."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, torch.float32 if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    try:
        return model.get_submodule(spec.layers_path)
    except AttributeError as e:
        raise SFMPError(f"model has no decoder layers at {spec.layers_path}") from e


@torch.no_grad()
def catch_layer0_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                        batch_size: int, device: torch.device) -> _Batches:
    """Run the model up to layer 0 where its embedding lives (the layers are not touched) and
    keep what layer 0 receives, moved to `device`."""
    caught = _Batches([], [])

    def catcher(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.hidden.append(_to(hidden, device))
        caught.kwargs.append(_to(dict(kwargs), device))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    embed_device = model.get_input_embeddings().weight.device
    try:
        for ids in input_ids.split(batch_size):
            try:
                model(input_ids=ids.to(embed_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return caught


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(layer: nn.Module, batches: _Batches, names: list[str],
                   stop: bool = True) -> dict[str, torch.Tensor]:
    """Inputs [T, K] of the named linears over all batches (forward stops after the last)."""
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
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def run_layer(layer: nn.Module, batches: _Batches) -> _Batches:
    """Outputs of the layer on every batch: the next layer's inputs (same kwargs)."""
    return _Batches([_layer_output(layer(h, **kw)) for h, kw in zip(batches.hidden,
                                                                     batches.kwargs)],
                    batches.kwargs)


def _quantize_group(layer: nn.Module, prefix: str, group: list[str],
                    plans: Mapping[str, LinearPlan], quantizer: Quantizer,
                    inputs: torch.Tensor | None) -> dict[str, QuantizedCodes]:
    """Quantize the linears of one input group and write their dequantized weights back."""
    out: dict[str, QuantizedCodes] = {}
    reordered: tuple[torch.Tensor, torch.Tensor] | None = None  # (perm, inputs[:, perm])
    for name in group:
        full, plan = f"{prefix}.{name}", plans[f"{prefix}.{name}"]
        linear = layer.get_submodule(name)
        context = LinearContext()
        if inputs is not None:
            # Linears of a group share one input order: reorder (and let GPTQ hash) once.
            if reordered is None or not torch.equal(reordered[0], plan.input_perm):
                reordered = (plan.input_perm, plan.reorder_inputs(inputs))
            context = LinearContext(inputs=reordered[1])
        weight_r = plan.reorder(linear.weight.to(torch.float32))
        try:
            codes = quantizer.quantize(weight_r, plan.block_bits, plan.geometry, context)
        except SFMPError as e:
            raise SFMPError(f"layer {full}: {e}") from e
        deq = plan.restore(dequantize_codes(codes, plan.geometry))
        linear.weight.data.copy_(deq.to(linear.weight.dtype))
        out[full] = QuantizedCodes(codes.codes.cpu(), codes.scale.cpu(), codes.zero.cpu())
    return out


def _quantize_layer(layer: nn.Module, prefix: str, spec: ArchSpec,
                    plans: Mapping[str, LinearPlan], quantizer: Quantizer,
                    batches: _Batches | None) -> tuple[dict[str, QuantizedCodes], list[str]]:
    """Steps 2a and 2b for one layer on its device; returns codes and changed parameter names."""
    planned = [n for n in spec.linears if f"{prefix}.{n}" in plans]
    changed: list[str] = []
    if batches is not None and isinstance(quantizer, LayerPreparer):
        fp_inputs = capture_inputs(layer, batches, planned)
        local = {n: plans[f"{prefix}.{n}"] for n in planned}
        changed = quantizer.prepare_layer(layer, spec, local, fp_inputs, prefix)
        del fp_inputs
    codes: dict[str, QuantizedCodes] = {}
    for group in spec.input_groups:
        members = [n for n in group if n in planned]
        if not members:
            continue
        inputs = None
        if batches is not None:
            inputs = capture_inputs(layer, batches, members[:1])[members[0]]
        codes.update(_quantize_group(layer, prefix, members, plans, quantizer, inputs))
    return codes, changed


@torch.no_grad()
def quantize_sequential(model: nn.Module, spec: ArchSpec, plans: Mapping[str, LinearPlan],
                        quantizer: Quantizer, input_ids: torch.Tensor | None = None,
                        device: str = "cpu", batch_size: int = 4,
                        source: SafetensorsSource | None = None) -> SequentialResult:
    """Quantize every planned linear (full module names) of `model`, one decoder layer at a time.

    input_ids [n, seqlen]: calibration sequences (needed when the quantizer has needs_inputs).
    The model is modified in place: quantized linears hold their dequantized weights, AWQ's
    folds are applied. With `source`, layer weights are loaded from it and dropped afterwards
    (the model's layers may live on the meta device).
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    needs_inputs = bool(getattr(quantizer, "needs_inputs", False))
    if needs_inputs and input_ids is None:
        raise SFMPError(f"method {getattr(quantizer, 'name', '?')} needs calibration data")
    layers = decoder_layers(model, spec)
    batches = (catch_layer0_inputs(model, layers, input_ids, batch_size, dev)
               if needs_inputs else None)
    result = SequentialResult(codes={})
    for i, layer in enumerate(tqdm(layers, desc=f"quantize ({getattr(quantizer, 'name', '')})",
                                   unit="layer")):
        prefix = f"{spec.layers_path}.{i}"
        home_dtype = next(layer.parameters()).dtype
        with materialised(layer, prefix, dev, source):
            codes, changed = _quantize_layer(layer, prefix, spec, plans, quantizer, batches)
            result.codes.update(codes)
            quantized = {name[len(prefix) + 1:] + ".weight" for name in codes}
            for name in sorted(set(changed) - quantized):
                result.tensors[f"{prefix}.{name}"] = layer.get_parameter(name).detach().to(
                    "cpu", home_dtype if source is None else source.dtype(f"{prefix}.{name}"))
            if batches is not None:
                batches = run_layer(layer, batches)
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
