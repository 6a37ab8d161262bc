"""`sfmp quantize`: quantize a Hugging Face causal LM directory into an SFMP checkpoint."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sfmp_serve.errors import SFMPError

if TYPE_CHECKING:  # `sfmp --help` stays light
    from sfmp_serve.api import QuantizeSummary
    from sfmp_serve.recipe import Recipe

# Kept in sync with offline.pipeline (not imported here: `sfmp --help` must stay light).
DEFAULT_NSAMPLES = 32
DEFAULT_SEQLEN = 256

EPILOG = """\
calibration (--calib):
  omitted            data-free: sequences sampled from the model itself, starting from BOS
  FILE.txt           plain text; FILE.jsonl with a "text" field; FILE.parquet with a "text" column
  hf:NAME[:CONFIG[:SPLIT]]  a Hugging Face dataset (needs the 'datasets' package and network)
Text is tokenized as one stream and cut into --nsamples random windows of --seqlen tokens.

defaults are sized for 2 CPU cores: 32 x 256 calibration tokens (sampling + Fisher pass) took
about 2 minutes for SmolLM2-135M on 2 idle Xeon cores, 40 s with --device cuda on an H100,
and several times longer on a busy machine. The reference method uses 128 x 512
(--nsamples 128 --seqlen 512), best with --device cuda.

every checkpoint holds the recipe that made it (OUT/recipe.yaml) and a model card
(OUT/README.md); `sfmp quantize MODEL --recipe OUT/recipe.yaml --out OUT2` makes the same
tensors again. A killed run leaves its progress beside OUT; --resume continues it.

examples:
  sfmp quantize models/smollm2-bf16 --bits 3.25 --out models/smollm2-w3.25
  sfmp quantize MODEL --bits 3.0 --levels 3 --bit-choices 2,3,4 --out OUT
  sfmp quantize MODEL --budget-gb 0.2 --out OUT
  sfmp quantize MODEL --bits 3.25 --method gptq --out OUT
  sfmp quantize MODEL --bits 3 --uniform --method awq --out OUT   (plain g128 baseline)
  sfmp quantize MODEL --bits 3.5 --method gptq --low-memory --calib text.txt --out OUT
  sfmp quantize MODEL --bits 3.25 --ignore 'layers\\.0\\.' --pin 'down_proj=4' --out OUT
  sfmp quantize MODEL --bits 3.25 --method gptq --method-arg percdamp=0.02 --out OUT
  sfmp quantize MODEL --recipe OTHER_CKPT/recipe.yaml --max-shard-size 2GB --out OUT
  sfmp quantize MODEL ... --out OUT --resume            (after a killed run)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a Hugging Face model into an SFMP checkpoint",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face causal LM directory")
    p.add_argument("--recipe", metavar="FILE", help="start from this recipe (YAML, e.g. "
                   "another checkpoint's recipe.yaml); the flags below override its values")
    r = p.add_argument_group("recipe (what is made; stored in OUT/recipe.yaml)")
    target = r.add_mutually_exclusive_group()
    target.add_argument("--bits", type=float, help="target average bits per weight (codes "
                        "only; alpha/beta add 2*16/group-size), e.g. 3.25")
    target.add_argument("--budget-gb", type=float, help="largest average bits whose checkpoint "
                        "tensors (packed linears + everything unquantized) fit in this many "
                        "GB (1e9 bytes)")
    r.add_argument("--levels", type=int, choices=(2, 3),
                   help="2: floor/ceil of --bits; 3: three bit-widths (default 2)")
    r.add_argument("--bit-choices", help="comma-separated bit-widths, as many as --levels, "
                   "e.g. 2,3,4 (default: 2 levels floor/ceil of --bits; 3 levels the nearest "
                   "integer and its neighbours; a budget searches 2..8 bits)")
    r.add_argument("--policy", choices=("salience", "perturbation"),
                   help="how blocks are ranked for the high widths: perturbation (the "
                   "Fisher-weighted rounding error each width would leave, FGMP; the default) "
                   "or salience (summed Fisher, METHOD.md)")
    r.add_argument("--tp-shards", type=int, metavar="K",
                   help="keep every permutation and block inside K tensor-parallel ranges, so "
                   "vLLM can serve the checkpoint at any --tensor-parallel-size dividing K "
                   "(default: 8, or the largest number below it that the model's heads and "
                   "widths divide into; 1: one global order, TP 1 only)")
    r.add_argument("--group-size", type=int,
                   help="inputs per quantization group, multiple of 8 (default 128)")
    r.add_argument("--block-rows", type=int, help="output rows per allocation block "
                   "(default 512)")
    r.add_argument("--uniform", action="store_true", default=None, help="baseline: no "
                   "salience or reordering (identity orders), every block gets the same "
                   "integer --bits; awq/gptq still calibrate")
    r.add_argument("--calib", metavar="SOURCE", help="calibration text (see below; default: "
                   "data-free sampling from the model)")
    r.add_argument("--nsamples", type=int, help=f"calibration sequences (default "
                   f"{DEFAULT_NSAMPLES})")
    r.add_argument("--seqlen", type=int, help=f"tokens per calibration sequence (default "
                   f"{DEFAULT_SEQLEN})")
    r.add_argument("--seed", type=int, help="calibration seed (default 0)")
    r.add_argument("--method", help="quantizer: rtn (round to nearest), awq (activation-aware "
                   "scales + clipping) or gptq (Hessian error feedback); awq/gptq run layer by "
                   "layer on the calibration data (default gptq)")
    r.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="a field of the "
                   "method's config, e.g. percdamp=0.02 (rtn: clip; gptq: percdamp, blocksize, "
                   "damp_retries, clip; awq: grid, clip_grid, max_shrink; clip=fisher: "
                   "Fisher-weighted clipping of each group's range, clip=minmax: none); "
                   "repeatable")
    r.add_argument("--ignore", action="append", metavar="REGEX", help="leave the linears whose "
                   "full name matches (re.search) in their original dtype, e.g. "
                   "'layers\\.0\\.' ; repeatable")
    r.add_argument("--pin", action="append", metavar="REGEX=BITS", help="give every block of "
                   "the matching linears BITS bits; counted in the average, the other blocks "
                   "make up the difference; repeatable")
    run_opts = p.add_argument_group("running (not part of the recipe)")
    run_opts.add_argument("--salience-cache", metavar="FILE", default=None,
                          help="reuse the Fisher salience stored in FILE if it exists (it must "
                          "match the model and calibration), else compute and store it there: "
                          "quantizing to several bit-widths then pays for salience once")
    run_opts.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                          help="device for calibration, salience and awq/gptq (default "
                          "%(default)s)")
    run_opts.add_argument("--low-memory", action="store_true",
                          help="never load the whole model: read one decoder layer at a time "
                          "from the safetensors files (salience and quantization layer by "
                          "layer; needs --calib, as data-free sampling runs the whole model)")
    run_opts.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                          help="largest weights file, e.g. 5GB, 500MB, 2GiB (default "
                          "%(default)s); larger checkpoints get shards and an index")
    run_opts.add_argument("--resume", action="store_true", help="continue the interrupted run "
                          "of --out (same model, recipe and shard size) to the same bytes")
    run_opts.add_argument("--card-metric", action="append", metavar="NAME=VALUE",
                          help="a measured number for the model card (OUT/README.md), e.g. "
                          "'wikitext-2 ppl=14.2'; repeatable")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _pairs(values: list[str] | None, flag: str, what: str) -> list[tuple[str, str]]:
    """'KEY=VALUE' flags as pairs, split at the last '=' (a regex may contain one)."""
    out = []
    for value in values or []:
        key, eq, rest = value.rpartition("=")
        if not eq or not key:
            raise SFMPError(f"{flag} {value!r}: expected {what}")
        out.append((key, rest))
    return out


def _regex(flag: str, pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise SFMPError(f"{flag} {pattern!r}: not a regular expression ({e})") from e
    return pattern


def _yaml_value(text: str) -> object:
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_recipe(args: argparse.Namespace) -> "Recipe":
    """The recipe the flags describe: --recipe's (or the defaults), each flag given
    replacing its value."""
    import dataclasses

    from offline.allocation import parse_bit_choices
    from sfmp_serve.recipe import Method, Overrides, Recipe

    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    top: dict = {}
    if args.bits is not None:
        top.update(bits=args.bits, budget_gb=None)
    if args.budget_gb is not None:
        top.update(budget_gb=args.budget_gb, bits=None)
    for key in ("levels", "uniform", "policy", "tp_shards"):
        if getattr(args, key) is not None:
            top[key] = getattr(args, key)
    if args.bit_choices is not None:
        top["bit_choices"] = parse_bit_choices(args.bit_choices)
    block = {k: v for k, v in (("group_size", args.group_size), ("rows", args.block_rows))
             if v is not None}
    calibration = {k: v for k, v in (("source", args.calib), ("nsamples", args.nsamples),
                                     ("seqlen", args.seqlen), ("seed", args.seed))
                   if v is not None}
    method = recipe.method
    if args.method is not None and args.method != method.name:
        method = Method(args.method)  # the recipe's arguments belong to its own method
    if args.method_arg:
        method = Method(method.name, {**method.args, **{
            k: _yaml_value(v) for k, v in _pairs(args.method_arg, "--method-arg",
                                                 "KEY=VALUE")}})
    pins = []
    for pattern, bits in _pairs(args.pin, "--pin", "REGEX=BITS"):
        if not bits.strip().isdigit():
            raise SFMPError(f"--pin {pattern}={bits}: BITS must be an integer")
        pins.append((_regex("--pin", pattern), int(bits)))
    for pattern in args.ignore or []:
        _regex("--ignore", pattern)
    overrides = Overrides.from_dict({
        "ignore": args.ignore if args.ignore is not None else list(recipe.overrides.ignore),
        "pin": pins if args.pin is not None else list(recipe.overrides.pin)},
        "command line")
    return dataclasses.replace(
        recipe, **top, method=method, overrides=overrides,
        block=dataclasses.replace(recipe.block, **block),
        calibration=dataclasses.replace(recipe.calibration, **calibration))


def _metrics(values: list[str] | None) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in _pairs(values, "--card-metric", "NAME=VALUE")}


def _print_summary(summary: "QuantizeSummary") -> None:
    ignored = f" ({summary.ignored} left unquantized)" if summary.ignored else ""
    target = "" if summary.target_bits is None else f" (target {summary.target_bits:.4f})"
    files = "1 file" if summary.shards == 1 else f"{summary.shards} shards"
    print(f"wrote {summary.path}: {summary.quantized} linears{ignored}, avg "
          f"{summary.avg_bits:.4f} bits{target}, {summary.bits_per_weight:.4f} bits/weight "
          f"stored, bit choices {list(summary.bit_choices)}, "
          f"{summary.size_bytes / 1e6:.1f} MB in {files}")
    if summary.resumed_layers:
        print(f"resumed: {summary.resumed_layers} decoder layers came from the interrupted run")
    total = sum(summary.stage_seconds.values())
    print("stage times:")
    for stage, seconds in summary.stage_seconds.items():
        print(f"  {stage:<12} {seconds:8.2f} s")
    print(f"  {'total':<12} {total:8.2f} s")


def run(args: argparse.Namespace) -> int:
    from sfmp_serve.api import quantize

    summary = quantize(Path(args.model_dir), build_recipe(args), out=Path(args.out),
                       overwrite=args.overwrite, resume=args.resume,
                       low_memory=args.low_memory, device=args.device,
                       salience_cache=args.salience_cache,
                       max_shard_size=args.max_shard_size, metrics=_metrics(args.card_metric))
    _print_summary(summary)
    return 0
