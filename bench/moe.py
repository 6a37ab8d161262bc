"""Mixture-of-experts benchmark on tiny random Mixtral and Qwen3-MoE models (no real MoE model
ships in a package on these machines): where the global allocation puts the bits among the
experts, against how often calibration routes tokens to them, and CPU serving speed of the
SFMP checkpoint against the unquantized model in vLLM.

    .venv/bin/python bench/moe.py --out bench/results/moe.json

Per family: a tiny random model with 8 experts (top-2) is built, quantized with GPTQ at
--bits on --calib text; the routed token count of every expert is measured on exactly the
calibration tokens the pipeline used (a hook on each sparse block's experts); the per-expert
average bits come from the checkpoint (sfmp_serve.inspect). Then both models are served, one
after the other, by vLLM's CPU server (torch.compile on, as users run it), and a batch of
--requests greedy completions of --max-tokens tokens is timed (output tokens/s, the median of
--repeats runs after one warm-up) plus one single-stream request (decode tokens/s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline.calibration import CalibrationSpec, text_calibration  # noqa: E402
from offline.pipeline import QuantizeOptions, quantize_model, save_result  # noqa: E402
from sfmp_serve.arch import arch_for  # noqa: E402
from sfmp_serve.experts import LinearExperts, unroll_experts  # noqa: E402
from sfmp_serve.inspect import summarize  # noqa: E402
from tests.procs import Proc, free_port, request  # noqa: E402
from tests.tiny import make_family_model, make_tokenizer  # noqa: E402

EXPERTS = {"mixtral": dict(num_local_experts=8), "qwen3_moe": dict(num_experts=8)}
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
VLLM_ARGS = ["--served-model-name", "m", "--dtype", "float32", "--max-model-len", "256",
             "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "8"]


def routed_counts(model_dir: Path, tokens: torch.Tensor) -> dict[str, list[int]]:
    """Tokens routed to each expert of every sparse block (top-k slots counted)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec = arch_for(model.config.model_type)
    unroll_experts(model, spec)
    counts: dict[str, list[int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, LinearExperts):
            block = spec.stored_key(name + ".x").rpartition(".experts")[0]  # checkpoint name

            def hook(mod, args, block=block):
                ids = args[1].flatten()
                ids = ids[(ids >= 0) & (ids < mod.num_experts)]
                c = torch.bincount(ids, minlength=mod.num_experts).tolist()
                counts[block] = [a + b for a, b in zip(counts.get(block, [0] * len(c)), c)]
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in tokens:
            model(row[None])
    for h in hooks:
        h.remove()
    return counts


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return torch.tensor(r)
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def serve_speed(model: Path, sfmp: bool, args, log_path: Path) -> dict:
    """Batch output tokens/s and single-stream decode tokens/s of one served model."""
    port = free_port()
    cmd = ([sys.executable, "-m", "sfmp_serve.cli.main", "serve", str(model), "--verbose"]
           if sfmp else [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                         "--model", str(model)])
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-prom-")}
    proc = Proc([*cmd, "--port", str(port), *VLLM_ARGS], log_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        proc.wait_http(f"{url}/health", timeout_s=600)
        startup = time.perf_counter() - start
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 380, (32,), generator=gen).tolist()
                   for _ in range(args.requests)]

        def run(batch: list[list[int]]) -> float:
            t0 = time.perf_counter()
            out = request(f"{url}/v1/completions", {
                "model": "m", "prompt": batch, "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True}, timeout=600)
            return out["usage"]["completion_tokens"] / (time.perf_counter() - t0)
        run(prompts)  # warm-up: compiles the remaining batch sizes
        batch = [run(prompts) for _ in range(args.repeats)]
        single = [run(prompts[:1]) for _ in range(args.repeats)]
        return {"startup_s": startup, "batch_tok_s": statistics.median(batch),
                "single_tok_s": statistics.median(single), "batch_runs": batch,
                "single_runs": single}
    finally:
        proc.stop()


def bench_family(model_type: str, args, root: Path) -> dict:
    model_dir = make_family_model(root / model_type / "model", model_type,
                                  **EXPERTS[model_type])
    options = QuantizeOptions(bits=args.bits, budget_gb=None, levels=3, bit_choices=(2, 3, 4),
                              group_size=32, block_rows=16, nsamples=args.nsamples,
                              seqlen=args.seqlen, method="gptq", calib=args.calib)
    start = time.perf_counter()
    result = quantize_model(model_dir, options)
    ckpt = save_result(result, model_dir, root / model_type / "sfmp")
    quantize_s = time.perf_counter() - start
    spec = CalibrationSpec(args.calib, args.nsamples, args.seqlen, 0)
    counts = routed_counts(model_dir, text_calibration(spec, make_tokenizer()))
    summary = summarize(ckpt)
    experts = []
    for block, bits in summary.expert_bits.items():
        for e, avg in bits.items():
            experts.append({"block": block, "expert": e, "tokens": counts[block][e],
                            "avg_bits": avg})
    rho = spearman([x["tokens"] for x in experts], [x["avg_bits"] for x in experts])
    out = {"model_type": model_type, "avg_bits": summary.avg_bits,
           "bits_per_weight": summary.bits_per_weight, "quantize_s": quantize_s,
           "experts": experts, "spearman_tokens_bits": rho}
    if not args.no_serve:
        out["serve"] = {
            "unquantized": serve_speed(model_dir, False, args, root / f"{model_type}-fp.log"),
            "sfmp": serve_speed(ckpt, True, args, root / f"{model_type}-sfmp.log")}
    return out


def print_family(r: dict) -> None:
    print(f"\n{r['model_type']}: {r['avg_bits']:.3f} avg bits, {r['bits_per_weight']:.3f} BPW,"
          f" Spearman(tokens, bits) = {r['spearman_tokens_bits']:.2f}")
    print("| block | expert | routed tokens | avg bits |\n|---|---:|---:|---:|")
    for x in r["experts"]:
        print(f"| {x['block']} | {x['expert']} | {x['tokens']} | {x['avg_bits']:.2f} |")
    if "serve" in r:
        fp, q = r["serve"]["unquantized"], r["serve"]["sfmp"]
        print(f"serving: batch {fp['batch_tok_s']:.1f} -> {q['batch_tok_s']:.1f} tok/s "
              f"({q['batch_tok_s'] / fp['batch_tok_s']:.2f}x), single stream "
              f"{fp['single_tok_s']:.1f} -> {q['single_tok_s']:.1f} tok/s "
              f"({q['single_tok_s'] / fp['single_tok_s']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="mixtral,qwen3_moe")
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--calib", default=None,
                        help=f".txt calibration text (default: the text of {DEFAULT_TEXT})")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-serve", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {"load_average": os.getloadavg(), "threads": torch.get_num_threads(),
               "families": []}
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        if args.calib is None:  # the pipeline reads .txt files by their suffix
            args.calib = str(Path(tmp) / "calib.txt")
            Path(args.calib).write_text(Path(DEFAULT_TEXT).read_text())
        for model_type in args.families.split(","):
            r = bench_family(model_type, args, Path(tmp))
            results["families"].append(r)
            print_family(r)
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average {results['load_average']} -> {results['load_average_end']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
