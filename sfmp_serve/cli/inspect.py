"""`sfmp inspect CKPT`: bits, storage, sizes and a block bit-width heatmap of a checkpoint."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="summarise an SFMP checkpoint",
        description="Validate an SFMP checkpoint and print its average bits, bits per weight "
                    "(incl. scales and tables), size on disk vs. unquantized, and the "
                    "bit-width histogram per layer type.")
    p.add_argument("ckpt", metavar="CKPT", help="SFMP checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw every layer's block bits to FILE.png")
    p.add_argument("--verify", action="store_true",
                   help="also check every tensor against its checksum and the checkpoint "
                        "against the model of config.json (what `sfmp serve` checks)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sfmp_serve.inspect import format_summary, plot_block_bits, summarize

    summary = summarize(args.ckpt, verify=args.verify)
    print(json.dumps(summary.to_json(), indent=2) if args.json else format_summary(summary))
    if args.plot:
        out = plot_block_bits(summary, args.plot)
        if not args.json:  # keep --json output parseable
            print(f"plot written to {out}")
    return 0
