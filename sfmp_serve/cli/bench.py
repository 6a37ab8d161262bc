"""`sfmp bench`: load-test an OpenAI-compatible /v1/completions server over concurrency levels."""

from __future__ import annotations

import argparse

from sfmp_serve.errors import SFMPError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="load-test an OpenAI-compatible completions server",
        description="Streams completions at each concurrency level and reports request and "
                    "token throughput, TTFT and inter-token latency percentiles, and errors. "
                    "Token counts come from the server's usage fields.")
    p.add_argument("--url", required=True,
                   help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--model", help="model name to request (default: first of GET /v1/models)")
    p.add_argument("--concurrency", type=_int_list, default=(1, 4, 16),
                   help="comma-separated requests in flight per level (default 1,4,16)")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per level (default 32)")
    p.add_argument("--input-len", type=int, default=128,
                   help="prompt length in tokens for random prompts (default 128)")
    p.add_argument("--output-len", type=int, default=128,
                   help="tokens generated per request, EOS ignored (default 128)")
    p.add_argument("--prompt-file", help="text prompts, one per line, instead of random tokens")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="random prompt token ids are drawn from [0, N) (default 256)")
    p.add_argument("--seed", type=int, default=0, help="prompt sampling seed (default 0)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds allowed per request (default 600)")
    p.add_argument("--label", help="name for this run in plots and JSON (default: model)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot throughput and latency against concurrency")
    p.add_argument("--compare", action="append", default=[], metavar="RESULT.json",
                   help="earlier `--json` output to overlay in --plot (repeatable)")
    p.set_defaults(func=run)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _base_url(url: str) -> str:
    """Server root from what users paste: with or without a trailing / or /v1."""
    if not url.startswith(("http://", "https://")):
        raise SFMPError(f"--url must start with http:// or https://, got {url!r}")
    url = url.rstrip("/")
    return url[:-len("/v1")] if url.endswith("/v1") else url


def run(args: argparse.Namespace) -> int:
    import asyncio

    from sfmp_serve.bench import BenchConfig, run_sweep
    from sfmp_serve.bench.prompts import file_prompts, random_token_prompts
    from sfmp_serve.bench.report import format_table, load_json, plot, to_json

    if args.output_len < 1:
        raise SFMPError(f"--output-len must be at least 1, got {args.output_len}")
    if args.compare and not args.plot:
        raise SFMPError("--compare only makes sense with --plot")
    earlier = [load_json(path) for path in args.compare]  # fail before the long run
    if args.prompt_file:
        prompts = file_prompts(args.prompt_file, args.num_prompts, args.seed)
    else:
        prompts = random_token_prompts(args.num_prompts, args.input_len, args.seed,
                                       args.vocab_size)
    config = BenchConfig(base_url=_base_url(args.url), model=args.model,
                         concurrencies=args.concurrency, prompts=tuple(prompts),
                         output_len=args.output_len,
                         input_len=None if args.prompt_file else args.input_len,
                         label=args.label, timeout_s=args.timeout)
    result = asyncio.run(run_sweep(config)).to_dict()
    print(to_json(result) if args.json else format_table(result))
    if args.plot:
        plot([*earlier, result], args.plot)
    failed = sum(level["errors"] for level in result["levels"])
    # A run where every request failed measured nothing: say so in the exit status.
    return 1 if failed and not any(level["completed"] for level in result["levels"]) else 0
