"""Prompts for the load generator: seeded random token-id prompts or lines of a file.

Random prompts are lists of token ids, which vLLM's /v1/completions accepts as `prompt`: the
server then sees exactly `input_len` tokens (no tokenizer round trip, no BOS added), so input
length is controlled rather than estimated. Ids are drawn from [0, vocab_size); the default
range is small enough to exist in every vocabulary we serve, and with `ignore_eos` a special
token inside a prompt changes nothing about the load.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Union

from sfmp_serve.errors import SFMPError

Prompt = Union[str, list[int]]


def random_token_prompts(count: int, input_len: int, seed: int,
                         vocab_size: int = 256) -> list[list[int]]:
    """`count` prompts of exactly `input_len` token ids, reproducible from `seed`."""
    if count < 1:
        raise SFMPError(f"--num-prompts must be at least 1, got {count}")
    if input_len < 1:
        raise SFMPError(f"--input-len must be at least 1, got {input_len}")
    if vocab_size < 2:
        raise SFMPError(f"--vocab-size must be at least 2, got {vocab_size}")
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(count)]


def file_prompts(path: str | Path, count: int, seed: int) -> list[str]:
    """`count` text prompts from a file with one prompt per line, shuffled by `seed`.

    Lines are reused cyclically when the file has fewer than `count` prompts; their token
    counts are whatever the server's tokenizer makes of them (read back from `usage`).
    """
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise SFMPError(f"cannot read prompt file {path}: {e.strerror}") from e
    lines = [line for line in lines if line]
    if not lines:
        raise SFMPError(f"prompt file {path} has no non-empty lines")
    random.Random(seed).shuffle(lines)
    return [lines[i % len(lines)] for i in range(count)]
