"""`sfmp eval ppl|lm-eval`: perplexity, or lm-eval's tasks, of an HF directory, an SFMP
checkpoint, or a running server."""

from __future__ import annotations

import argparse
import json
import logging
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity, lm-eval tasks)")
    tasks = p.add_subparsers(dest="task", required=True)
    ppl = tasks.add_parser(
        "ppl", help="perplexity on a text file",
        description="Perplexity on a text file. The text is tokenized once without special "
                    "tokens and cut into non-overlapping windows of --seqlen tokens; with a BOS "
                    "token each window is BOS + seqlen-1 text tokens and every text token is "
                    "scored. --server scores the same windows through /v1/completions "
                    "(prompt token ids, echo, logprobs), so both paths agree.")
    ppl.add_argument("path", nargs="?", metavar="MODEL_OR_CKPT",
                     help="HF model directory or SFMP checkpoint (omit with --server)")
    ppl.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    ppl.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    ppl.add_argument("--max-tokens", type=int, default=None, metavar="N",
                     help="score only the first N text tokens")
    ppl.add_argument("--json", action="store_true",
                     help='print {"ppl", "tokens", "seqlen", ...} as JSON')
    ppl.add_argument("--device", default="cpu", help="torch device of the HF path (cpu, cuda)")
    ppl.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                     help="HF path: compute dtype (default: the model's)")
    ppl.add_argument("--packed", action="store_true",
                     help="HF path, SFMP checkpoint: run the packed reference op in every "
                          "forward (slow) instead of dequantizing each linear once at load "
                          "(same weights, same float32 accumulation)")
    ppl.add_argument("--server", metavar="URL", help="OpenAI-compatible server, e.g. "
                                                     "http://127.0.0.1:8000")
    ppl.add_argument("--model", metavar="NAME",
                     help="--server: served model name (default: the first in /v1/models)")
    ppl.add_argument("--tokenizer", metavar="DIR",
                     help="--server: tokenizer directory (default: MODEL_OR_CKPT, else the "
                          "served model name when it is a local directory)")
    ppl.add_argument("--concurrency", type=int, default=4, help="--server: requests in flight")
    ppl.set_defaults(func=run_ppl)
    _register_lm_eval(tasks)


def _register_lm_eval(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser(
        "lm-eval", help="lm-evaluation-harness tasks (needs the lm-eval package)",
        description="Run EleutherAI's lm-evaluation-harness. A checkpoint or model directory "
                    "runs on the transformers path (an SFMP checkpoint through sfmp_serve.hf, "
                    "its linears dequantized once unless --packed); --server runs lm-eval's "
                    "local-completions model against an OpenAI-compatible server (vLLM: "
                    "`sfmp serve CKPT`), scoring with echo + prompt logprobs.")
    p.add_argument("path", nargs="?", metavar="MODEL_OR_CKPT",
                   help="HF model directory or SFMP checkpoint (omit with --server)")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="comma-separated lm-eval task or group names")
    p.add_argument("--include-path", metavar="DIR", help="directory of your own task YAML files")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples per prompt")
    p.add_argument("--limit", type=float, metavar="N",
                   help="documents per task (a fraction of them if below 1); for quick checks")
    p.add_argument("--batch-size", type=int, default=1, help="transformers path: batch size")
    p.add_argument("--device", default="cpu", help="transformers path: torch device")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="transformers path: compute dtype (default: the model's)")
    p.add_argument("--packed", action="store_true",
                   help="transformers path, SFMP checkpoint: run the packed op in every forward")
    p.add_argument("--server", metavar="URL", help="OpenAI-compatible server, e.g. "
                                                   "http://127.0.0.1:8000")
    p.add_argument("--model", metavar="NAME",
                   help="--server: served model name (default: the first in /v1/models)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="--server: tokenizer directory (default: MODEL_OR_CKPT, else the "
                        "served model name when it is a local directory)")
    p.add_argument("--concurrency", type=int, default=4, help="--server: requests in flight")
    p.add_argument("--json", action="store_true", help="print {task: {metric: value}} as JSON")
    p.add_argument("--samples", metavar="FILE",
                   help="write one JSON line per scored document (responses, metrics)")
    p.set_defaults(func=run_lm_eval)


def run_ppl(args: argparse.Namespace) -> int:
    from sfmp_serve.errors import SFMPError
    from sfmp_serve.eval.windows import read_text

    if not args.server and not args.path:
        raise SFMPError("give MODEL_OR_CKPT or --server URL")
    text = read_text(args.text)
    if args.server:
        result = _server_ppl(args, text)
    else:
        result = _hf_ppl(args, text)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.tokens} tokens "
              f"({result.windows} windows of <= {result.seqlen})")
    return 0


def _hf_ppl(args: argparse.Namespace, text: str):
    import torch

    from sfmp_serve.eval.hf_ppl import hf_perplexity, load_model_and_tokenizer
    from sfmp_serve.eval.windows import tokenize_windows

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_model_and_tokenizer(args.path, args.device, dtype, args.packed)
    windows = tokenize_windows(tokenizer, text, args.seqlen, args.max_tokens)
    return hf_perplexity(model, windows, args.seqlen)


def _server_ppl(args: argparse.Namespace, text: str):
    from transformers import AutoTokenizer

    from sfmp_serve.eval.server_ppl import server_perplexity, tokenizer_source
    from sfmp_serve.eval.windows import tokenize_windows

    source = tokenizer_source(args.server, args.model, args.tokenizer or args.path)
    windows = tokenize_windows(AutoTokenizer.from_pretrained(source), text, args.seqlen,
                               args.max_tokens)
    return server_perplexity(args.server, windows, args.seqlen, model=args.model,
                             concurrency=args.concurrency)


def run_lm_eval(args: argparse.Namespace) -> int:
    from sfmp_serve.errors import SFMPError
    from sfmp_serve.eval import harness

    if not args.server and not args.path:
        raise SFMPError("give MODEL_OR_CKPT or --server URL")
    if args.limit is not None and args.limit <= 0:
        raise SFMPError(f"--limit {args.limit:g}: must be positive")
    if args.batch_size < 1:
        raise SFMPError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise SFMPError(f"--num-fewshot {args.num_fewshot}: must be at least 0")
    if args.samples and (os.path.isdir(args.samples)
                         or not os.path.isdir(os.path.dirname(os.path.abspath(args.samples)))):
        raise SFMPError(f"--samples {args.samples}: not a file in an existing directory")
    options = harness.HarnessOptions(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        include_path=args.include_path, num_fewshot=args.num_fewshot,
        limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
        log_samples=bool(args.samples))
    if not args.verbose:  # lm-eval reports every step at INFO; its warnings still show
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = harness.check_tasks(options)
    if args.server:
        lm = harness.server_lm(args.server, args.model, args.tokenizer or args.path,
                               args.concurrency)
    else:
        import torch
        dtype = getattr(torch, args.dtype) if args.dtype else None
        lm = harness.hf_lm(args.path, args.batch_size, args.device, dtype, args.packed)
    results = harness.evaluate(lm, options, manager)
    if args.samples:
        with open(args.samples, "w", encoding="utf-8") as f:
            for record in harness.samples(results):
                f.write(json.dumps(record, default=str) + "\n")
    if args.json:
        print(json.dumps(harness.summary(results), default=str))
    else:
        from lm_eval.utils import make_table
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    return 0
