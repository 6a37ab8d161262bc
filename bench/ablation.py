"""Where SFMP's quality comes from, and where it is lost: ablations at one BPW target.

Runs through the real pipeline (`quantize_model` + `save_result`), scored like bench/quality.py
(same held-out text, windows and token count), each differing from full SFMP in one thing:
- `sfmp`: Fisher salience, reordering, Fisher-ranked block bits (the method under test);
- `no-reorder`: the same allocation rule on blocks of the ORIGINAL order (identity orders);
- `random-placement`: reordering kept, the same bit mix placed on randomly ranked blocks;
- `uniform-rtn-4bit-g32`: plain 4-bit RTN on groups of 32, the grid of the GGUF Q4_1 file the
  embedded SmolLM2 comes from (its weights are d*q + m on exactly such groups), so it should
  give back the unquantized model almost exactly: a check of what re-quantization on another
  grid costs;
- any `uniform-METHOD-Bbit-gG` (e.g. `uniform-awq-3bit-g64`): a uniform baseline at another
  group size, to compare at equal bits per weight rather than at g128 only;
- `uniform-rtn-Bbit-gG-float-offset`: RTN whose grid starts at the group's minimum (a float
  offset, as GGUF's Q4_1 stores: w = d q + m) instead of the GPTQ convention the quantizers use
  (range widened to contain 0, integer zero point). The format can hold either: beta is a
  float per group.
The ablations are done by swapping one pipeline function for the run (unittest.mock), not by
flags in the product.

    .venv/bin/python bench/ablation.py --model models/smollm2-bf16 --bpw 3.5 --method gptq \
        --out bench/results/ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (bench/quality.py: storage line, perplexity, held-out text)

log = logging.getLogger("bench.ablation")


def identity_orders(salience, input_groups, ranges=None):
    from offline.reorder import identity_order
    return {n: identity_order(*s.shape) for n, s in salience.items()}


def random_block_sums(seed: int):
    import torch
    gen = torch.Generator().manual_seed(seed)

    def block_sums(matrix, geometry):
        return torch.rand(geometry.n_block_rows, geometry.n_groups, generator=gen,
                          dtype=torch.float64)
    return block_sums


UNIFORM = re.compile(r"uniform-(rtn|awq|gptq)-(\d)bit-g(\d+)(-float-offset)?")


def float_offset_params(wmin, wmax, maxq):
    """blockwise.minmax_params with the grid starting at the group minimum: zero = -min / s,
    not rounded, and the range not widened to contain 0."""
    import torch
    scale = (wmax - wmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, -wmin / scale


def float_offset_codes(w, scale, zero, maxq):
    """blockwise.quantize_codes for a float zero: round after adding it."""
    import torch
    return torch.minimum(torch.round(w / scale + zero).clamp_(min=0), maxq)


def run_one(label: str, args: argparse.Namespace, code_bits: float, text: str) -> dict:
    from offline import pipeline
    from offline.pipeline import QuantizeOptions, quantize_model, save_result

    uniform = UNIFORM.fullmatch(label)
    method, bits, group = ((uniform[1], float(uniform[2]), int(uniform[3])) if uniform
                           else (args.method, code_bits, args.group_size))
    options = QuantizeOptions(
        bits=bits, budget_gb=None, group_size=group, block_rows=args.block_rows,
        method=method, uniform=bool(uniform), nsamples=args.nsamples,
        seqlen=args.calib_seqlen, device=args.device,
        # The issue-3 ablations swap the summed-Fisher ranking (block_sums): salience policy.
        policy="salience", salience_cache=str(Path(args.work) / "salience.safetensors"))
    ckpt = Path(args.work) / f"ablation-{label}"
    with ExitStack() as stack:
        if uniform and uniform[4]:
            if method != "rtn":
                raise SystemExit(f"{label}: -float-offset is an RTN ablation")
            from offline.quantizers import blockwise
            stack.enter_context(mock.patch.object(blockwise, "minmax_params",
                                                  float_offset_params))
            stack.enter_context(mock.patch.object(blockwise, "quantize_codes",
                                                  float_offset_codes))
        if label == "no-reorder":
            stack.enter_context(mock.patch.object(pipeline, "salience_orders", identity_orders))
        elif label == "random-placement":
            stack.enter_context(mock.patch.object(pipeline.alloc, "block_sums",
                                                  random_block_sums(args.seed)))
        start = time.perf_counter()
        result = quantize_model(args.model, options)
        save_result(result, args.model, ckpt, overwrite=True)
        seconds = time.perf_counter() - start
    record = {"label": label, "method": options.method, "group_size": options.group_size,
              "avg_bits": result.config.avg_bits, "bpw": result.config.bits_per_weight,
              "quant_seconds": round(seconds, 1)}
    record.update(quality.perplexity(ckpt, text, args.eval_seqlen, args.max_tokens))
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("%s: bpw %.3f ppl %.3f", label, record["bpw"], record["ppl"])
    return record


def table(results: dict, meta: dict) -> str:
    lines = [f"Ablations at {meta['bpw']} BPW, method {meta['method']}, model `{meta['model']}`; "
             f"perplexity on `{meta['text']}` ({meta['max_tokens']} tokens, windows of "
             f"{meta['eval_seqlen']}).", "",
             "| run | method | group | avg code bits | BPW | ppl |", "|---|---|---|---|---|---|"]
    if "baseline" in results:
        lines.append(f"| unquantized | - | - | - | {results['baseline']['bpw']:.2f} | "
                     f"{results['baseline']['ppl']:.3f} |")
    for label in [*LABELS, *sorted(k for k in results if k not in LABELS)]:
        r = results.get(label)
        if r and label not in ("baseline", "meta"):
            lines.append(f"| {label} | {r['method']} | {r['group_size']} | {r['avg_bits']:.3f} | "
                         f"{r['bpw']:.3f} | {r['ppl']:.3f} |")
    return "\n".join(lines) + "\n"


LABELS = ("sfmp", "no-reorder", "random-placement", "uniform-rtn-4bit-g32")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/smollm2-bf16")
    p.add_argument("--out", default="bench/results/ablation")
    p.add_argument("--work", default="/tmp/sfmp-quality", help="checkpoints and the salience "
                                                              "cache (shared with quality.py)")
    p.add_argument("--text", default=None)
    p.add_argument("--bpw", type=float, default=3.5)
    p.add_argument("--method", default="gptq", choices=("rtn", "awq", "gptq"))
    p.add_argument("--runs", default=",".join(LABELS), help="comma-separated, from "
                   + ", ".join(LABELS) + " and uniform-METHOD-Bbit-gG")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--block-rows", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="random-placement seed")
    args = p.parse_args(argv)
    unknown = {r for r in args.runs.split(",") if r not in LABELS and not UNIFORM.fullmatch(r)}
    if unknown:
        p.error(f"--runs: unknown {sorted(unknown)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    text_path = Path(args.text) if args.text else quality.default_heldout_text()
    text = text_path.read_text(encoding="utf-8")
    overhead, slope = quality.storage_line(args.model, args.group_size, args.block_rows)
    code_bits = round((args.bpw - overhead) / slope, 4)
    meta = {"model": args.model, "text": str(text_path), "bpw": args.bpw, "method": args.method,
            "code_bits": code_bits, "eval_seqlen": args.eval_seqlen,
            "max_tokens": args.max_tokens}
    if "baseline" not in results:
        results["baseline"] = {**quality.perplexity(Path(args.model), text, args.eval_seqlen,
                                                    args.max_tokens),
                               "bpw": float(quality.model_dtype(args.model).itemsize * 8)}
    for label in args.runs.split(","):
        if label not in results:
            results[label] = run_one(label, args, code_bits, text)
            results["meta"] = meta
            results_file.write_text(json.dumps(results, indent=2) + "\n")
    results["meta"] = meta
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    (out / "ablation.md").write_text(table(results, meta))
    print(table(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
