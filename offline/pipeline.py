"""The offline SFMP pipeline: wires the stages, times them, and nothing else.

load -> calibration -> salience -> reorder -> allocation -> quantize -> pack -> export
The math lives in the stage modules. With `low_memory` the decoder layers are never all in
memory: they are read one at a time from the safetensors files by layer-wise salience and the
layer-at-a-time engine (data-free calibration, which samples from the whole model, is then
not available). What gets quantized is the model's TargetSet (offline.targets); every method
is a registered Quantizer (offline.quantizers.base) and runs through the one layer-at-a-time
engine (offline.sequential).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from offline import allocation as alloc
from offline.calibration import CalibrationSpec, calibration_tokens
from offline.export import (act_dtype_name, bits_per_weight, nbytes, pack_codes,
                            packed_nbytes, save_checkpoint, unquantized_tensors)
from offline.layerwise_salience import layerwise_fisher
from offline.model_io import LoadedModel, load_model, load_streamed, load_tokenizer
from offline.quantizers.base import QuantizedCodes, Quantizer, make_quantizer, methods
from offline.reorder import Order, identity_order, salience_orders
from offline.salience import fisher_diagonal, load_salience, resolve_device, save_salience
from offline.sequential import make_plans, quantize_sequential
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import MAX_BITS, LayerGeometry, PackedLinear, SFMPConfig

log = logging.getLogger(__name__)

# CPU-sized defaults: 32 x 256 tokens keep SmolLM2-135M's sampling + Fisher pass to about two
# minutes on 2 idle cores (the reference uses 128 x 512 on a GPU; pass those with --device cuda).
DEFAULT_NSAMPLES = 32
DEFAULT_SEQLEN = 256
STAGES = ("load", "calibration", "salience", "reorder", "allocation", "quantize", "pack",
          "export")


@dataclass
class QuantizeOptions:
    bits: float | None
    budget_gb: float | None
    levels: int = 2
    bit_choices: tuple[int, ...] | None = None
    group_size: int = 128
    block_rows: int = 512
    method: str = "rtn"
    calib: str | None = None  # None: data-free (sampled from the model)
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = 0
    device: str = "cpu"
    uniform: bool = False  # baseline: no salience, identity orders, one integer bit-width
    # Fisher diagonal file: reused when it exists (and matches model and calibration), written
    # otherwise, so quantizing one model to several bit-widths computes the salience once.
    salience_cache: str | None = None
    # Stream decoder layers from the checkpoint: peak memory one layer plus activations.
    low_memory: bool = False

    def validate(self) -> None:
        """Every check that needs no model, so bad flags fail before minutes of work."""
        if (self.bits is None) == (self.budget_gb is None):
            raise SFMPError("pass exactly one of --bits and --budget-gb")
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise SFMPError(f"--budget-gb={self.budget_gb}: must be positive")
        alloc.check_block_shape(self.group_size, self.block_rows)
        make_quantizer(self.method)  # names the registered methods if it is not one
        resolve_device(self.device)
        if self.uniform:
            if self.bits is not None and self.bits != int(self.bits):
                raise SFMPError(f"--bits={self.bits}: --uniform needs an integer bit-width")
            if self.bits is not None:
                alloc.check_choices((int(self.bits),))
        elif self.bits is not None:
            alloc.resolve_choices(self.bits, self.levels, self.bit_choices)
        elif self.levels not in (2, 3):
            raise SFMPError(f"--levels={self.levels}: expected 2 or 3")
        elif self.bit_choices is not None:  # budget: the target is searched inside the choices
            alloc.resolve_choices(self.bit_choices[0], self.levels, self.bit_choices)
        CalibrationSpec(self.calib, self.nsamples, self.seqlen, self.seed)


@dataclass
class QuantizeResult:
    config: SFMPConfig
    packed: dict[str, PackedLinear]
    hf_config: dict[str, Any]
    extra_tensors: dict[str, torch.Tensor]
    stage_seconds: dict[str, float] = field(default_factory=dict)


def needs_calibration(method: str) -> bool:
    """Does the method read calibration inputs (so it needs data even with --uniform)?"""
    return methods()[method].needs_inputs


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Stages (thin wrappers binding the stage modules to a LoadedModel)
# --------------------------------------------------------------------------------------------
def geometries(loaded: LoadedModel, options: QuantizeOptions) -> dict[str, LayerGeometry]:
    return {t.name: LayerGeometry(t.out_features, t.in_features, options.group_size,
                                  options.block_rows) for t in loaded.targets}


def budget_range(options: QuantizeOptions) -> tuple[int, int]:
    """Lowest and highest average bits a --budget-gb search may reach."""
    choices = options.bit_choices
    return (choices[0], choices[-1]) if choices else (alloc.DEFAULT_MIN_BITS, MAX_BITS)


def checkpoint_bytes(geos: dict[str, LayerGeometry], block_bits: dict[str, torch.Tensor],
                     act_dtype: torch.dtype, extra_bytes: int) -> int:
    """Exact tensor bytes of the checkpoint an allocation produces."""
    return extra_bytes + sum(packed_nbytes(geos[n], block_bits[n], act_dtype) for n in geos)


def check_budget_reachable(loaded: LoadedModel, geos: dict[str, LayerGeometry],
                           extra_bytes: int, options: QuantizeOptions) -> None:
    """Before minutes of calibration: does even the lowest bit-width everywhere fit?"""
    if options.budget_gb is None:
        return
    lowest = budget_range(options)[0]
    bits = {n: torch.full((g.n_block_rows, g.n_groups), lowest, dtype=torch.uint8)
            for n, g in geos.items()}
    smallest = checkpoint_bytes(geos, bits, loaded.act_dtype, extra_bytes)
    if smallest > options.budget_gb * 1e9:
        raise SFMPError(alloc.budget_too_small(options.budget_gb, lowest, smallest))


def allocate_bits(loaded: LoadedModel, importance: dict[str, torch.Tensor],
                  geos: dict[str, LayerGeometry], extra_bytes: int,
                  options: QuantizeOptions) -> alloc.Allocation:
    """Block bits from --bits, or the largest average that fits --budget-gb."""
    sizes = {name: alloc.block_sizes(geo) for name, geo in geos.items()}

    def at(target: float) -> alloc.Allocation:
        if options.uniform:
            return alloc.allocate(importance, sizes, math.floor(target), (math.floor(target),))
        choices = alloc.resolve_choices(target, options.levels, options.bit_choices)
        return alloc.allocate(importance, sizes, target, choices, warn=options.bits is not None)

    if options.bits is not None:
        return at(options.bits)
    result = alloc.fit_budget(
        int(options.budget_gb * 1e9), at,
        lambda a: checkpoint_bytes(geos, a.block_bits, loaded.act_dtype, extra_bytes),
        *budget_range(options))
    if abs(result.avg_bits - result.target_bits) > alloc.AVG_TOLERANCE:
        log.warning("achieved average %.4f bits for target %.4f", result.avg_bits,
                    result.target_bits)
    return result


def quantize_layerwise(loaded: LoadedModel, quantizer: Quantizer, tokens: torch.Tensor | None,
                       orders: dict[str, Order], allocation: alloc.Allocation,
                       geos: dict[str, LayerGeometry], device: str,
                       extra: dict[str, torch.Tensor]) -> tuple[dict[str, QuantizedCodes],
                                                                dict[str, torch.Tensor]]:
    """One decoder layer at a time (offline.sequential), every method; calibrated methods on
    the layer's calibration inputs.

    Tensors the method changes besides the quantized weights (AWQ folds scales into norms and
    biases) replace their copies in `extra`; the changed biases of quantized linears, which
    `extra` does not hold, are returned for packing.
    """
    plans = make_plans(orders, allocation.block_bits, geos)
    result = quantize_sequential(loaded.model, loaded.targets, plans, quantizer, tokens, device,
                                 source=loaded.source)
    changed_biases = {}
    for key, value in result.tensors.items():
        if key in extra:
            extra[key] = value.to(extra[key].dtype)
        else:
            changed_biases[key] = value
    return result.codes, changed_biases


def pack_linears(loaded: LoadedModel, codes: dict[str, QuantizedCodes],
                 orders: dict[str, Order], allocation: alloc.Allocation,
                 geos: dict[str, LayerGeometry],
                 changed: dict[str, torch.Tensor] | None = None) -> dict[str, PackedLinear]:
    """Bit planes of every linear; biases from `changed` (AWQ) or else the checkpoint."""
    changed = changed or {}
    out = {}
    for name in tqdm(codes, desc="pack", unit="linear", leave=False):
        bias = None
        if loaded.targets[name].has_bias:
            key = f"{name}.bias"
            bias = changed[key] if key in changed else loaded.read(key)
            bias = bias.to(loaded.orig_dtypes.get(key, loaded.act_dtype))
        out[name] = pack_codes(codes[name], allocation.block_bits[name], geos[name],
                               orders[name], loaded.act_dtype, bias)
    return out


def build_config(loaded: LoadedModel, options: QuantizeOptions, allocation: alloc.Allocation,
                 packed: dict[str, PackedLinear], quantizer: Quantizer) -> SFMPConfig:
    calibrated = not options.uniform or needs_calibration(options.method)
    calibration = ({"source": "none"} if not calibrated else
                   CalibrationSpec(options.calib, options.nsamples, options.seqlen,
                                   options.seed).describe())
    # How the bits were chosen travels with the method's own arguments (if it has any).
    method_args = {**quantizer.method_args, "levels": options.levels,
                   "allocation": "uniform" if options.uniform else "fisher"}
    if options.budget_gb is not None:
        method_args["budget_gb"] = options.budget_gb
    return SFMPConfig(
        group_size=options.group_size, block_rows=options.block_rows,
        bit_choices=allocation.bit_choices, avg_bits=round(allocation.avg_bits, 6),
        bits_per_weight=round(bits_per_weight(packed), 6),
        act_dtype=act_dtype_name(loaded.act_dtype), quantized_modules=tuple(packed),
        input_groups=loaded.spec.input_groups, target_bits=allocation.target_bits,
        method=quantizer.name, method_args=method_args, calibration=calibration)


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
def _calibration(loaded: LoadedModel, options: QuantizeOptions, timer: StageTimer,
                 device: torch.device) -> torch.Tensor:
    """Calibration tokens [nsamples, seqlen] (the model is already on `device`)."""
    if options.calib is None and loaded.streamed:
        raise SFMPError("--low-memory needs --calib: data-free calibration samples text from "
                        "the whole model, which --low-memory never loads")
    with timer("calibration"):
        spec = CalibrationSpec(options.calib, options.nsamples, options.seqlen, options.seed)
        return calibration_tokens(spec, loaded.model, loaded.hf_config,
                                  lambda: load_tokenizer(loaded.path), device)


def _method_tokens(loaded: LoadedModel, options: QuantizeOptions, timer: StageTimer,
                   device: torch.device) -> torch.Tensor | None:
    """Calibration tokens for a calibrated method when salience needs none (uniform, cache)."""
    if not needs_calibration(options.method):
        return None
    with loaded.on_device(device):  # data-free calibration samples from the model on `device`
        return _calibration(loaded, options, timer, device)


def salience_of(loaded: LoadedModel, tokens: torch.Tensor,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Fisher diagonal of every decoder linear: whole-model backward, or layer by layer when the
    layers are streamed (the same numbers up to floating-point summation order)."""
    if loaded.streamed:
        return layerwise_fisher(loaded.model, loaded.targets, tokens, str(device),
                                loaded.source)
    return fisher_diagonal(loaded.model, loaded.targets, tokens, device)


def _salience_stages(loaded: LoadedModel, options: QuantizeOptions, timer: StageTimer,
                     geos: dict[str, LayerGeometry],
                     ) -> tuple[torch.Tensor | None, dict[str, Order], dict[str, torch.Tensor]]:
    """calibration, salience, reorder -> (tokens, orders, reordered block importance)."""
    device = resolve_device(options.device)
    if options.uniform:  # baseline: nothing is ranked; only a calibrated method needs data
        orders = {n: identity_order(g.out_features, g.in_features) for n, g in geos.items()}
        return _method_tokens(loaded, options, timer, device), orders, {
            n: torch.zeros(g.n_block_rows, g.n_groups) for n, g in geos.items()}
    cache = Path(options.salience_cache) if options.salience_cache else None
    cache_key = {"model": str(Path(loaded.path).resolve()),
                 **CalibrationSpec(options.calib, options.nsamples, options.seqlen,
                                   options.seed).describe()}
    if cache is not None and cache.exists():
        with timer("salience"):
            salience = load_salience(cache, cache_key, loaded.targets)
        # A calibrated method still needs the tokens, which are cheap next to the salience.
        tokens = _method_tokens(loaded, options, timer, device)
    else:
        with loaded.on_device(device):
            tokens = _calibration(loaded, options, timer, device)
            with timer("salience"):
                salience = salience_of(loaded, tokens, device)
        if cache is not None:
            save_salience(cache, salience, cache_key)
    with timer("reorder"):
        orders = salience_orders(salience, loaded.input_groups)
        importance = {n: alloc.block_sums(orders[n].apply(s), geos[n])
                      for n, s in salience.items()}
    return tokens, orders, importance


def quantize_model(model_dir: str | os.PathLike, options: QuantizeOptions) -> QuantizeResult:
    """Run every stage on MODEL_DIR; the result is ready for `save_result`."""
    options.validate()
    timer = StageTimer()
    with timer("load"):
        loaded = (load_streamed if options.low_memory else load_model)(model_dir)
        geos = geometries(loaded, options)
    with timer("export"):  # the unquantized tensors' size is part of a budget
        extra = unquantized_tensors(loaded.model, loaded.targets.targets, loaded.orig_dtypes,
                                    loaded.source)
    check_budget_reachable(loaded, geos, nbytes(extra), options)
    tokens, orders, importance = _salience_stages(loaded, options, timer, geos)
    with timer("allocation"):
        allocation = allocate_bits(loaded, importance, geos, nbytes(extra), options)
    log.info("allocation: target %.4f bits, achieved %.4f over choices %s",
             allocation.target_bits, allocation.avg_bits, allocation.bit_choices)
    with timer("quantize"):
        quantizer = make_quantizer(options.method)
        codes, changed = quantize_layerwise(loaded, quantizer, tokens, orders, allocation,
                                            geos, options.device, extra)
    with timer("pack"):
        packed = pack_linears(loaded, codes, orders, allocation, geos, changed)
    with timer("export"):
        config = build_config(loaded, options, allocation, packed, quantizer)
        for name, p in packed.items():
            p.validate(name, config, (geos[name].out_features, geos[name].in_features))
    seconds = {s: timer.seconds[s] for s in STAGES if s in timer.seconds}
    return QuantizeResult(config, packed, loaded.hf_config, extra, seconds)


def save_result(result: QuantizeResult, model_dir: str | os.PathLike,
                out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the checkpoint atomically; the write time is added to the export stage."""
    start = time.perf_counter()
    out = save_checkpoint(out_dir, model_dir, result.hf_config, result.config, result.packed,
                          result.extra_tensors, overwrite=overwrite)
    result.stage_seconds["export"] = (result.stage_seconds.get("export", 0.0)
                                      + time.perf_counter() - start)
    return out
