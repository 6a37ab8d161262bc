"""`sfmp eval ppl`: perplexity of an HF directory, an SFMP checkpoint, or a running server."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity)")
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
