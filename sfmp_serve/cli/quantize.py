"""`sfmp quantize`: quantize a Hugging Face causal LM directory into an SFMP checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from sfmp_serve.errors import SFMPError

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

examples:
  sfmp quantize models/smollm2-bf16 --bits 3.25 --out models/smollm2-w3.25
  sfmp quantize MODEL --bits 3.0 --levels 3 --bit-choices 2,3,4 --out OUT
  sfmp quantize MODEL --budget-gb 0.2 --out OUT
  sfmp quantize MODEL --bits 3.25 --method gptq --out OUT
  sfmp quantize MODEL --bits 3 --uniform --method awq --out OUT   (plain g128 baseline)
  sfmp quantize MODEL --bits 3.5 --method gptq --low-memory --calib text.txt --out OUT
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a Hugging Face model into an SFMP checkpoint",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face causal LM directory")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--bits", type=float, help="target average bits per weight (codes "
                        "only; alpha/beta add 2*16/group-size), e.g. 3.25")
    target.add_argument("--budget-gb", type=float, help="largest average bits whose checkpoint "
                        "tensors (packed linears + everything unquantized) fit in this many "
                        "GB (1e9 bytes)")
    p.add_argument("--levels", type=int, choices=(2, 3), default=2,
                   help="2: floor/ceil of --bits; 3: three bit-widths (default %(default)s)")
    p.add_argument("--bit-choices", help="comma-separated bit-widths, as many as --levels, "
                   "e.g. 2,3,4 (default: 2 levels floor/ceil of --bits; 3 levels the nearest "
                   "integer and its neighbours; a budget searches 2..8 bits)")
    p.add_argument("--group-size", type=int, default=128,
                   help="inputs per quantization group, multiple of 8 (default %(default)s)")
    p.add_argument("--block-rows", type=int, default=512,
                   help="output rows per allocation block (default %(default)s)")
    p.add_argument("--uniform", action="store_true", help="baseline: no salience or "
                   "reordering (identity orders), every block gets the same integer --bits; "
                   "awq/gptq still calibrate")
    p.add_argument("--calib", metavar="SOURCE", help="calibration text (see below; default: "
                   "data-free sampling from the model)")
    p.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES,
                   help="calibration sequences (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN,
                   help="tokens per calibration sequence (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (default %(default)s)")
    p.add_argument("--salience-cache", metavar="FILE", default=None,
                   help="reuse the Fisher salience stored in FILE if it exists (it must match "
                        "the model and calibration), else compute and store it there: "
                        "quantizing to several bit-widths then pays for salience once")
    p.add_argument("--method", default="rtn", help="quantizer: rtn (round to nearest), awq "
                   "(activation-aware scales + clipping) or gptq (Hessian error feedback); "
                   "awq/gptq run layer by layer on the calibration data (default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device for calibration, salience and awq/gptq (default %(default)s)")
    p.add_argument("--low-memory", action="store_true",
                   help="never load the whole model: read one decoder layer at a time from "
                        "the safetensors files (salience and quantization layer by layer; "
                        "needs --calib, as data-free sampling runs the whole model)")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _check_paths(model_dir: Path, out: Path, overwrite: bool) -> None:
    """Fail before minutes of work, not after (once an interrupted earlier write of `out` is
    finished or cleaned up, so that `out` is what that run left)."""
    from sfmp_serve.atomic_dir import recover

    try:
        recover(out)
    except OSError as e:
        raise SFMPError(f"{out}: cannot clean up after an interrupted run ({e})") from e
    if out.exists() and not overwrite:
        raise SFMPError(f"{out}: output directory exists (pass --overwrite to replace it)")
    if out.resolve() == model_dir.resolve():
        raise SFMPError(f"--out {out}: must differ from MODEL_DIR")


def _print_summary(result, out: Path) -> None:
    cfg = result.config
    print(f"wrote {out}: {len(cfg.quantized_modules)} linears, avg {cfg.avg_bits:.4f} bits "
          f"(target {cfg.target_bits:.4f}), {cfg.bits_per_weight:.4f} bits/weight stored, "
          f"bit choices {list(cfg.bit_choices)}")
    total = sum(result.stage_seconds.values())
    print("stage times:")
    for stage, seconds in result.stage_seconds.items():
        print(f"  {stage:<12} {seconds:8.2f} s")
    print(f"  {'total':<12} {total:8.2f} s")


def run(args: argparse.Namespace) -> int:
    from offline.allocation import parse_bit_choices
    from offline.pipeline import QuantizeOptions, quantize_model, save_result

    model_dir, out = Path(args.model_dir), Path(args.out)
    _check_paths(model_dir, out, args.overwrite)
    options = QuantizeOptions(
        bits=args.bits, budget_gb=args.budget_gb, levels=args.levels,
        bit_choices=parse_bit_choices(args.bit_choices) if args.bit_choices else None,
        group_size=args.group_size, block_rows=args.block_rows, method=args.method,
        calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        device=args.device, uniform=args.uniform,
        salience_cache=args.salience_cache, low_memory=args.low_memory)
    result = quantize_model(model_dir, options)
    save_result(result, model_dir, out, overwrite=args.overwrite)
    _print_summary(result, out)
    return 0
