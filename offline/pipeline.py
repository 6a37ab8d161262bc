"""The offline SFMP pipeline: wires the stages, times them, and nothing else.

load -> calibration -> salience -> reorder -> allocation -> quantize -> pack -> export
The math lives in the stage modules. Everything up to the allocation is decided before any
layer is quantized (`plan_quantization` -> Plan, small enough for a resumed run to reload);
then the layer-at-a-time engine (offline.sequential) quantizes one decoder layer at a time and
`layer_units` packs each as it finishes into a Unit of stored tensors, which a writer puts on
disk (offline.writer) or `quantize_model` collects in memory. With `low_memory` the decoder
layers are never all in memory: they are read one at a time from the safetensors files by
layer-wise salience and the engine (data-free calibration, which samples from the whole model,
is then not available). What gets quantized is the model's TargetSet (offline.targets) minus
the linears the overrides leave out (offline.overrides); every method is a registered
Quantizer (offline.quantizers.base).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from offline import allocation as alloc
from offline.calibration import CalibrationSpec, calibration_tokens
from offline.export import (Unit, act_dtype_name, layer_unit, outside_unit, packed_nbytes,
                            save_checkpoint, unquantized_nbytes)
from offline.layerwise_salience import layerwise_fisher
from offline.model_io import LoadedModel, load_model, load_streamed, load_tokenizer
from offline.overrides import Selection, select
from offline.perturbation import block_errors
from offline.quantizers.base import Quantizer, make_quantizer, methods
from offline.reorder import Order, identity_order, salience_orders
from offline.salience import fisher_diagonal, load_salience, resolve_device, save_salience
from offline.sequential import make_plans, quantize_layers
from offline.tp_plan import LinearShape, TPPlan, plan_tp
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import (MAX_BITS, BitStats, LayerGeometry, PackedLinear, SFMPConfig,
                               checkpoint_config, linear_ranges, relative_name)
from sfmp_serve.recipe import DEFAULT_METHOD, DEFAULT_POLICY

log = logging.getLogger(__name__)

# CPU-sized defaults: 32 x 256 tokens keep SmolLM2-135M's sampling + Fisher pass to about two
# minutes on 2 idle cores (the reference uses 128 x 512 on a GPU; pass those with --device cuda).
DEFAULT_NSAMPLES = 32
DEFAULT_SEQLEN = 256
STAGES = ("load", "calibration", "salience", "reorder", "allocation", "quantize", "pack",
          "export")
POLICIES = ("salience", "perturbation")


@dataclass
class QuantizeOptions:
    """The pipeline's settings: a recipe (sfmp_serve.recipe) plus how to run it."""

    bits: float | None
    budget_gb: float | None
    levels: int = 2
    bit_choices: tuple[int, ...] | None = None
    group_size: int = 128
    block_rows: int = 512
    method: str = DEFAULT_METHOD
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
    method_args: Mapping[str, Any] = field(default_factory=dict)  # fields of the method Config
    ignore: tuple[str, ...] = ()  # regexes of linears left unquantized
    pins: tuple[tuple[str, int], ...] = ()  # (regex, bits) of linears at a fixed width
    policy: str = DEFAULT_POLICY  # block importance: Fisher-weighted errors, or summed Fisher
    # Tensor-parallel ranges for serving at any TP size dividing it; None: the largest up to
    # 8 the model allows (offline/tp_plan.py).
    tp_shards: int | None = None
    # Measurement only (bench/quality.py; not in recipes): False cuts attention into ranges
    # by width even where K does not divide the heads, to see what K ranges cost in quality
    # on such a model; vLLM cannot serve the result at TP K.
    tp_whole_heads: bool = True

    def validate(self) -> None:
        """Every check that needs no model, so bad flags fail before minutes of work."""
        if (self.bits is None) == (self.budget_gb is None):
            raise SFMPError("pass exactly one of --bits and --budget-gb")
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise SFMPError(f"--budget-gb={self.budget_gb}: must be positive")
        alloc.check_block_shape(self.group_size, self.block_rows)
        if self.tp_shards is not None and (isinstance(self.tp_shards, bool)
                                           or not isinstance(self.tp_shards, int)
                                           or self.tp_shards < 1):
            raise SFMPError(f"--tp-shards={self.tp_shards!r}: must be a positive integer")
        if self.policy not in POLICIES:
            raise SFMPError(f"--policy={self.policy!r}: expected one of {', '.join(POLICIES)}")
        make_quantizer(self.method, self.method_args)  # names the methods / arguments
        resolve_device(self.device)
        if self.uniform:
            if self.bits is not None and self.bits != int(self.bits):
                raise SFMPError(f"--bits={self.bits}: --uniform needs an integer bit-width")
            if self.bits is not None:
                alloc.check_choices((int(self.bits),))
        elif self.bits is not None and not self.pins:  # pins move the free blocks' target
            alloc.resolve_choices(self.bits, self.levels, self.bit_choices)
        elif self.levels not in (2, 3):
            raise SFMPError(f"--levels={self.levels}: expected 2 or 3")
        elif self.bit_choices is not None:  # the target is searched inside the choices
            alloc.resolve_choices(self.bit_choices[0], self.levels, self.bit_choices)
        CalibrationSpec(self.calib, self.nsamples, self.seqlen, self.seed)


@dataclass
class Plan:
    """Everything decided before the first layer is quantized; with the recipe, all a resumed
    run needs besides the model (offline.writer stores it)."""

    selection: Selection
    geos: dict[str, LayerGeometry]  # quantized targets, model order
    orders: dict[str, Order]
    allocation: alloc.Allocation
    tokens: torch.Tensor | None  # calibration tokens for a calibrated method
    config: SFMPConfig  # the checkpoint's config, bit statistics not yet known
    # Reordered Fisher diagonal (bfloat16) of every quantized target, for a method that weighs
    # its rounding errors by it (clip=fisher); None otherwise.
    fisher: dict[str, torch.Tensor] | None = None


@dataclass
class QuantizeResult:
    config: SFMPConfig
    packed: dict[str, PackedLinear]
    hf_config: dict[str, Any]
    extra_tensors: dict[str, torch.Tensor]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    options: QuantizeOptions | None = None


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

    def ordered(self) -> dict[str, float]:
        return {s: self.seconds[s] for s in STAGES if s in self.seconds}


# --------------------------------------------------------------------------------------------
# Allocation with a budget and pins
# --------------------------------------------------------------------------------------------
def tp_plan(loaded: LoadedModel, options: QuantizeOptions) -> TPPlan:
    """The tensor-parallel ranges of every target for --tp-shards (offline/tp_plan.py)."""
    shapes = [LinearShape(relative_name(t.name), t.out_features, t.in_features)
              for t in loaded.targets]
    return plan_tp(options.tp_shards, loaded.spec, loaded.hf_config, shapes,
                   options.tp_whole_heads)


def geometries(loaded: LoadedModel, options: QuantizeOptions,
               names: tuple[str, ...] | None = None,
               tp: TPPlan | None = None) -> dict[str, LayerGeometry]:
    ranges = (tp or tp_plan(loaded, options)).ranges
    return {t.name: LayerGeometry(t.out_features, t.in_features, options.group_size,
                                  options.block_rows, *linear_ranges(ranges, t.name))
            for t in loaded.targets if names is None or t.name in names}


def budget_range(options: QuantizeOptions) -> tuple[int, int]:
    """Lowest and highest average bits a --budget-gb search may give the free blocks."""
    choices = options.bit_choices
    return (choices[0], choices[-1]) if choices else (alloc.DEFAULT_MIN_BITS, MAX_BITS)


def checkpoint_bytes(geos: dict[str, LayerGeometry], block_bits: dict[str, torch.Tensor],
                     act_dtype: torch.dtype, extra_bytes: int) -> int:
    """Exact tensor bytes of the checkpoint an allocation produces."""
    return extra_bytes + sum(packed_nbytes(geos[n], block_bits[n], act_dtype) for n in geos)


def check_budget_reachable(geos: dict[str, LayerGeometry], extra_bytes: int,
                           act_dtype: torch.dtype, options: QuantizeOptions,
                           pinned: Mapping[str, int]) -> None:
    """Before minutes of calibration: does even the lowest bit-width everywhere fit?"""
    if options.budget_gb is None:
        return
    lowest = budget_range(options)[0]
    bits = {n: torch.full((g.n_block_rows, g.n_groups), pinned.get(n, lowest),
                          dtype=torch.uint8) for n, g in geos.items()}
    smallest = checkpoint_bytes(geos, bits, act_dtype, extra_bytes)
    if smallest > options.budget_gb * 1e9:
        raise SFMPError(alloc.budget_too_small(options.budget_gb, lowest, smallest))


def pin_bounds(options: QuantizeOptions) -> tuple[int, int]:
    """The lowest and highest average the blocks that are not pinned may take."""
    choices = options.bit_choices
    return (choices[0], choices[-1]) if choices else (1, MAX_BITS)


def check_pins_reachable(geos: dict[str, LayerGeometry], options: QuantizeOptions,
                         pinned: Mapping[str, int]) -> None:
    """Before minutes of calibration: can the free blocks make up for the pinned ones?"""
    if pinned and options.bits is not None:
        alloc.pinned_free_target({n: alloc.block_sizes(g) for n, g in geos.items()}, pinned,
                                 options.bits, pin_bounds(options))


def allocate_bits(importance: dict[str, torch.Tensor | alloc.BlockErrors],
                  geos: dict[str, LayerGeometry],
                  extra_bytes: int, act_dtype: torch.dtype, options: QuantizeOptions,
                  pinned: Mapping[str, int]) -> alloc.Allocation:
    """Block bits from --bits, or the largest average that fits --budget-gb; pinned linears
    at their widths, counted in the average."""
    sizes = {name: alloc.block_sizes(geo) for name, geo in geos.items()}
    free = {n: importance[n] for n in geos if n not in pinned}
    warn = options.bits is not None

    def choices_for(target: float) -> tuple[int, ...]:
        return alloc.resolve_choices(target, options.levels, options.bit_choices)

    def at(target: float) -> alloc.Allocation:
        if options.uniform:
            return alloc.allocate(importance, sizes, math.floor(target), (math.floor(target),))
        if not pinned:
            return alloc.allocate(importance, sizes, target, choices_for(target), warn=warn)
        return alloc.allocate_with_pins(free, sizes, pinned, target, choices_for,
                                        pin_bounds(options), warn)

    if options.bits is not None:
        return at(options.bits)
    lowest, highest = budget_range(options)
    if pinned:
        lowest, highest = alloc.pinned_range(sizes, pinned, lowest, highest)
    result = alloc.fit_budget(
        int(options.budget_gb * 1e9), at,
        lambda a: checkpoint_bytes(geos, a.block_bits, act_dtype, extra_bytes),
        lowest, highest)
    if abs(result.avg_bits - result.target_bits) > alloc.AVG_TOLERANCE:
        log.warning("achieved average %.4f bits for target %.4f", result.avg_bits,
                    result.target_bits)
    return result


def build_config(loaded: LoadedModel, options: QuantizeOptions, allocation: alloc.Allocation,
                 selection: Selection, quantizer: Quantizer, tp: TPPlan,
                 stats: BitStats | None = None) -> SFMPConfig:
    """The checkpoint's quantization_config (bit statistics from `stats` once known)."""
    calibrated = not options.uniform or needs_calibration(options.method)
    calibration = ({"source": "none"} if not calibrated else
                   CalibrationSpec(options.calib, options.nsamples, options.seqlen,
                                   options.seed).describe())
    # How the bits were chosen travels with the method's own arguments (if it has any).
    method_args = {**quantizer.method_args, "levels": options.levels,
                   "allocation": ("uniform" if options.uniform else
                                  "fisher" if options.policy == "salience" else
                                  "fisher-perturbation")}
    if options.budget_gb is not None:
        method_args["budget_gb"] = options.budget_gb
    if options.ignore:
        method_args["ignore"] = list(options.ignore)
    if options.pins:
        method_args["pin"] = dict(options.pins)
    config = SFMPConfig(
        group_size=options.group_size, block_rows=options.block_rows,
        bit_choices=allocation.bit_choices, avg_bits=round(allocation.avg_bits, 6),
        bits_per_weight=0.0, act_dtype=act_dtype_name(loaded.act_dtype),
        quantized_modules=selection.quantized, input_groups=loaded.targets.relative_groups(),
        target_bits=allocation.target_bits, method=quantizer.name, method_args=method_args,
        calibration=calibration, tp_shards=tp.shards, tp_ranges=tp.ranges)
    return config if stats is None else checkpoint_config(config, stats)


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


def salience_of(loaded: LoadedModel, tokens: torch.Tensor, device: torch.device,
                on_layer: Callable[[dict[str, torch.Tensor]], None] | None = None,
                ) -> dict[str, torch.Tensor]:
    """Fisher diagonal of every decoder linear: whole-model backward, or layer by layer when the
    layers are streamed (the same numbers up to floating-point summation order; `on_layer`
    then receives each layer's instead, offline.layerwise_salience)."""
    if loaded.streamed:
        return layerwise_fisher(loaded.model, loaded.targets, tokens, str(device),
                                loaded.source, on_layer)
    return fisher_diagonal(loaded.model, loaded.targets, tokens, device)


def error_widths(options: QuantizeOptions) -> tuple[int, ...]:
    """The widths the perturbation policy measures every block at: those the allocation may
    choose from (with pins or a budget, the free target is not known yet: every width the
    search may reach)."""
    if options.bit_choices is not None:
        return tuple(options.bit_choices)
    if options.bits is not None and not options.pins:
        return alloc.resolve_choices(options.bits, options.levels, None)
    lowest, highest = budget_range(options) if options.budget_gb is not None else (1, MAX_BITS)
    return tuple(range(max(1, math.floor(lowest)), min(MAX_BITS, math.ceil(highest)) + 1))


def _salience_stages(loaded: LoadedModel, options: QuantizeOptions, timer: StageTimer,
                     geos: dict[str, LayerGeometry], quantizer: Quantizer,
                     ) -> tuple[torch.Tensor | None, dict[str, Order],
                                dict[str, torch.Tensor | alloc.BlockErrors],
                                dict[str, torch.Tensor] | None]:
    """calibration, salience, reorder -> (tokens, orders, block importance, Fisher) of the
    linears in `geos` (ignored linears take no part in the orders). Importance is the summed
    Fisher of each block (salience policy) or its errors at each width (perturbation); the
    reordered Fisher itself is kept (bfloat16) only for a method that clips by it."""
    device = resolve_device(options.device)
    keep_fisher = quantizer.needs_fisher
    if options.uniform and not keep_fisher:  # baseline: nothing ranked; only inputs needed
        orders = {n: identity_order(g.out_features, g.in_features) for n, g in geos.items()}
        return _method_tokens(loaded, options, timer, device), orders, {
            n: torch.zeros(g.n_block_rows, g.n_groups) for n, g in geos.items()}, None
    cache = Path(options.salience_cache) if options.salience_cache else None
    cache_key = {"model": str(Path(loaded.path).resolve()),
                 **CalibrationSpec(options.calib, options.nsamples, options.seqlen,
                                   options.seed).describe()}
    orders: dict[str, Order] = {}
    importance: dict[str, torch.Tensor | alloc.BlockErrors] = {}
    fisher: dict[str, torch.Tensor] | None = {} if keep_fisher else None
    widths = error_widths(options) if options.policy == "perturbation" else ()

    def reorder(salience: dict[str, torch.Tensor]) -> None:
        """Orders and block importance of some layers' linears (their Fisher then goes, but
        for the bfloat16 copy a Fisher-clipping method reads)."""
        salience = {n: s for n, s in salience.items() if n in geos}
        found = ({n: identity_order(geos[n].out_features, geos[n].in_features)
                  for n in salience} if options.uniform else
                 salience_orders(salience, loaded.input_groups,
                                 {n: (geos[n].row_ranges, geos[n].col_ranges) for n in salience}))
        orders.update(found)
        for n, s in salience.items():
            f = found[n].apply(s)
            if fisher is not None:
                fisher[n] = f.to(torch.bfloat16)
            if options.uniform:
                importance[n] = torch.zeros(geos[n].n_block_rows, geos[n].n_groups)
            elif widths:
                weight = found[n].apply(loaded.read(f"{n}.weight").to(torch.float32))
                importance[n] = block_errors(weight, f, widths, geos[n], keep_fisher)
            else:
                importance[n] = alloc.block_sums(f, geos[n])

    if cache is not None and cache.exists():
        with timer("salience"):
            salience = load_salience(cache, cache_key, loaded.targets)
        with timer("reorder"):
            reorder(salience)
        # A calibrated method still needs the tokens, which are cheap next to the salience.
        tokens = _method_tokens(loaded, options, timer, device)
    else:
        with loaded.on_device(device):
            tokens = _calibration(loaded, options, timer, device)
            with timer("salience"):
                # Streamed without a cache to fill, each layer's Fisher is reduced as it
                # completes: memory stays one layer's, not 4 bytes per weight of the model.
                per_layer = reorder if loaded.streamed and cache is None else None
                salience = salience_of(loaded, tokens, device, per_layer)
        if cache is not None:
            save_salience(cache, salience, cache_key)
        if per_layer is None:
            with timer("reorder"):
                reorder(salience)
    del salience
    orders = {n: orders[n] for n in geos}  # model order, whatever order layers completed in
    importance = {n: importance[n] for n in geos}
    if not needs_calibration(options.method):
        tokens = None  # RTN reads no inputs: nothing for a resumed run to keep
    return tokens, orders, importance, fisher


def load(model_dir: str | os.PathLike, options: QuantizeOptions,
         timer: StageTimer) -> LoadedModel:
    with timer("load"):
        return (load_streamed if options.low_memory else load_model)(model_dir)


def plan_quantization(loaded: LoadedModel, options: QuantizeOptions, timer: StageTimer,
                      quantizer: Quantizer) -> Plan:
    """Overrides, calibration, salience, reorder, allocation: everything before the layers."""
    selection = select(loaded.targets, options.ignore, options.pins)
    tp = tp_plan(loaded, options)
    geos = geometries(loaded, options, selection.quantized, tp)
    extra_bytes = unquantized_nbytes(loaded, selection.quantized)
    check_budget_reachable(geos, extra_bytes, loaded.act_dtype, options, selection.pinned)
    check_pins_reachable(geos, options, selection.pinned)
    tokens, orders, importance, fisher = _salience_stages(loaded, options, timer, geos,
                                                          quantizer)
    with timer("allocation"):
        allocation = allocate_bits(importance, geos, extra_bytes, loaded.act_dtype, options,
                                   selection.pinned)
    log.info("allocation: target %.4f bits, achieved %.4f over choices %s",
             allocation.target_bits, allocation.avg_bits, allocation.bit_choices)
    config = build_config(loaded, options, allocation, selection, quantizer, tp)
    return Plan(selection, geos, orders, allocation, tokens, config, fisher)


def layer_units(loaded: LoadedModel, plan: Plan, quantizer: Quantizer,
                options: QuantizeOptions, timer: StageTimer, start: int = 0,
                hidden: list[torch.Tensor] | None = None) -> Iterator[Unit]:
    """Quantize and pack the decoder layers from `start` on, one Unit per layer as it is done
    (`hidden`: the calibration inputs of layer `start`, from a resumed run)."""
    plans = make_plans(plan.orders, plan.allocation.block_bits, plan.geos)
    quantizer.fisher = plan.fisher
    layers = quantize_layers(loaded.model, loaded.targets, plans, quantizer, plan.tokens,
                             options.device, source=loaded.source, start=start, hidden=hidden)
    while True:
        with timer("quantize"):
            result = next(layers, None)
        if result is None:
            return
        for name in result.codes if plan.fisher is not None else ():
            plan.fisher.pop(name, None)  # 2 bytes per weight no longer needed
        with timer("pack"):
            unit = layer_unit(loaded, plan.config, plan.geos, plan.orders,
                              plan.allocation.block_bits, result)
        yield unit


def quantize_model(model_dir: str | os.PathLike, options: QuantizeOptions) -> QuantizeResult:
    """Run every stage on MODEL_DIR and keep the result in memory, ready for `save_result`
    (sfmp_serve.quantize writes layer by layer instead)."""
    options.validate()
    timer = StageTimer()
    loaded = load(model_dir, options, timer)
    quantizer = make_quantizer(options.method, options.method_args)
    plan = plan_quantization(loaded, options, timer, quantizer)
    with timer("export"):
        extra = dict(outside_unit(loaded).tensors)
    packed: dict[str, PackedLinear] = {}
    stats = BitStats(0, 0, 0)
    for unit in layer_units(loaded, plan, quantizer, options, timer):
        packed.update(unit.packed)
        extra.update({k: t for k, t in unit.tensors.items()
                      if k.rpartition(".")[0] not in unit.packed})
        stats = unit.add_to(stats)
    config = checkpoint_config(plan.config, stats)
    return QuantizeResult(config, packed, loaded.hf_config, extra, timer.ordered(), options)


def save_result(result: QuantizeResult, model_dir: str | os.PathLike,
                out_dir: str | os.PathLike, overwrite: bool = False,
                **card: Any) -> Path:
    """Write the checkpoint atomically, with its recipe and model card when the result knows
    its options; the write time is added to the export stage. `card`: offline.card.model_card
    arguments (metrics=...)."""
    start = time.perf_counter()
    out = save_checkpoint(out_dir, model_dir, result.hf_config, result.config, result.packed,
                          result.extra_tensors, overwrite=overwrite, options=result.options,
                          **card)
    result.stage_seconds["export"] = (result.stage_seconds.get("export", 0.0)
                                      + time.perf_counter() - start)
    return out
