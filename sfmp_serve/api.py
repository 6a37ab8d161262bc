"""`sfmp_serve.quantize(model_dir, recipe, out=...)`: one call from a Hugging Face model directory
to a finished SFMP checkpoint, like llm-compressor's `oneshot` (what `sfmp quantize` runs).

The recipe (sfmp_serve.recipe) says what to make; the keyword arguments say how to run. The
checkpoint is written layer by layer as the layers finish (offline.writer), in shards of at most
`max_shard_size`, with its recipe (recipe.yaml) and a model card (README.md), and appears at
`out` atomically when complete. A run that is killed leaves its progress beside `out`;
`resume=True` continues it to the same bytes an uninterrupted run writes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sfmp_serve.errors import SFMPError
from sfmp_serve.recipe import RECIPE_FILE, Recipe, as_recipe
from sfmp_serve.shards import DEFAULT_MAX_SHARD_SIZE, parse_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeSummary:
    """What `quantize` wrote."""

    path: Path
    avg_bits: float  # achieved average code bits over the quantized linears
    target_bits: float | None
    bits_per_weight: float  # all stored bits of the quantized linears per weight
    bit_choices: tuple[int, ...]
    quantized: int  # linears stored in SFMP form
    ignored: int  # linears left in their original dtype (--ignore)
    size_bytes: int  # tensor bytes of the checkpoint
    shards: int
    resumed_layers: int  # decoder layers taken from an interrupted run
    recipe: Recipe
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _check_paths(model_dir: Path, out: Path, overwrite: bool, resume: bool) -> Path | None:
    """Fail before minutes of work, not after; the interrupted run to continue, if any."""
    from sfmp_serve.atomic_dir import recover, resumable, resumable_state

    if out.resolve() == model_dir.resolve():
        raise SFMPError(f"--out {out}: must differ from MODEL_DIR")
    try:
        recover(out)
    except OSError as e:
        raise SFMPError(f"{out}: cannot clean up after an interrupted run ({e})") from e
    if out.exists() and not overwrite:
        raise SFMPError(f"{out}: output directory exists (pass --overwrite to replace it)")
    partial = next(iter(resumable(out)), None)
    if partial is not None and not resume:
        raise SFMPError(f"{out}: an interrupted run left a partial checkpoint in {partial} "
                        f"({resumable_state(partial)}); pass --resume to continue it, or "
                        "delete that directory to start over")
    if partial is None and resume:
        log.warning("--resume: no interrupted run of %s found; starting from the beginning",
                    out)
    return partial


def quantize(model_dir: str | os.PathLike,
             recipe: Recipe | str | os.PathLike | Mapping[str, Any], *,
             out: str | os.PathLike, overwrite: bool = False, resume: bool = False,
             low_memory: bool = False, device: str = "cpu",
             salience_cache: str | os.PathLike | None = None,
             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
             metrics: Mapping[str, Any] | None = None) -> QuantizeSummary:
    """Quantize the causal LM in `model_dir` as `recipe` says and write the checkpoint `out`.

    recipe: a Recipe, a YAML file (e.g. another checkpoint's recipe.yaml) or a mapping in the
        recipe layout. overwrite: replace an existing `out` (kept until the new one is done).
    resume: continue the interrupted run of `out` (same model, recipe and shard size).
    low_memory: one decoder layer in memory at a time (needs calibration text).
    device: "cpu" or "cuda". salience_cache: reuse/store the Fisher salience in this file.
    max_shard_size: bytes per weights file (5GB default; "500MB", "2GiB" or an int).
    metrics: measured numbers for the model card, e.g. {"wikitext-2 perplexity": 14.2}.
    Bad input raises SFMPError with a one-line message; nothing is left half-written.
    """
    from offline import pipeline
    from offline.card import model_card
    from offline.export import CARD_FILE, copy_files, outside_unit
    from offline.quantizers.base import make_quantizer
    from offline.targets import decoder_layers
    from offline.writer import CheckpointWriter
    from sfmp_serve.atomic_dir import atomic_directory
    from sfmp_serve.format import checkpoint_config

    given = as_recipe(recipe)
    where = str(recipe) if isinstance(recipe, (str, os.PathLike)) else "recipe"
    recipe = given.resolved(where)
    recipe.validate()
    options = recipe.options(device, low_memory, None if salience_cache is None
                             else str(salience_cache))
    cap = parse_size(max_shard_size)
    model_dir, out = Path(model_dir), Path(out)
    partial = _check_paths(model_dir, out, overwrite, resume)
    if resume and partial is not None:  # before loading anything; a refusal keeps it
        CheckpointWriter.check(partial, CheckpointWriter.identity(recipe.to_dict(), model_dir,
                                                                  cap))
    timer = pipeline.StageTimer()
    loaded = pipeline.load(model_dir, options, timer)  # checks the model directory first
    quantizer = make_quantizer(options.method, options.method_args)
    identity = CheckpointWriter.identity(recipe.to_dict(), model_dir, cap)
    layers = len(decoder_layers(loaded.model, loaded.spec))
    with atomic_directory(out, overwrite, adopt=partial if resume else None,
                          keep_interrupted=True) as tmp:
        writer = (CheckpointWriter.reopen(tmp, identity) if resume and partial is not None
                  else CheckpointWriter.start(tmp, identity, layers))
        plan = writer.load_plan(pipeline.geometries(loaded, options))
        if plan is None:
            plan = pipeline.plan_quantization(loaded, options, timer, quantizer)
            writer.save_plan(plan)
        done = writer.done()
        if -1 not in done:
            with timer("export"):
                writer.add(outside_unit(loaded))
        start = len(done - {-1})
        for unit in pipeline.layer_units(loaded, plan, quantizer, options, timer, start,
                                         writer.hidden() if start else None):
            with timer("export"):
                writer.add(unit)
        config = checkpoint_config(plan.config, writer.stats())
        with timer("export"):
            texts = {RECIPE_FILE: recipe.dump(),
                     CARD_FILE: model_card(out.name, model_dir, loaded.hf_config, config,
                                           recipe, writer.nbytes(), writer.total_shards(),
                                           metrics)}
            shards = writer.finish(loaded.hf_config, config, copy_files(model_dir), texts)
    log.info("wrote %s: %d shard(s), %.1f MB of tensors", out, shards, writer.nbytes() / 1e6)
    return QuantizeSummary(
        out, config.avg_bits, config.target_bits, config.bits_per_weight, config.bit_choices,
        len(config.quantized_modules), len(plan.selection.ignored), writer.nbytes(), shards,
        start, recipe, timer.ordered())
