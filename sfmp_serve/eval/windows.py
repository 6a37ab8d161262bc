"""The evaluation windows: the one definition of "perplexity of a text" both paths share.

BOS handling: the text is tokenized ONCE, without special tokens, and cut into non-overlapping
windows. If the tokenizer has a BOS token, every window is [BOS] + (seqlen - 1) text tokens, so
every text token is scored (conditioned on BOS and the tokens before it in its window). Without
BOS a window is seqlen text tokens and its first token is not scored (nothing precedes it). In
both cases: score every position of a window except position 0. The last, shorter window is
kept, so the whole text counts. The HF path and the server path score exactly these windows,
which is why their perplexities agree.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from sfmp_serve.errors import SFMPError

# exp() of a larger mean NLL overflows a float.
MAX_MEAN_NLL = math.log(sys.float_info.max)


@dataclass(frozen=True)
class PplResult:
    ppl: float
    tokens: int  # scored tokens
    seqlen: int
    nll_sum: float  # natural-log negative log-likelihood, summed over scored tokens
    windows: int

    @classmethod
    def from_nll(cls, nll_sum: float, tokens: int, seqlen: int, windows: int) -> "PplResult":
        mean = nll_sum / tokens
        if not math.isfinite(mean) or mean > MAX_MEAN_NLL:
            raise SFMPError(f"perplexity exp({mean:.4g}) over {tokens} tokens is not a finite "
                            "number: the model's predictions are garbage")
        return cls(math.exp(mean), tokens, seqlen, nll_sum, windows)

    def to_json(self) -> dict[str, float | int]:
        return {"ppl": self.ppl, "tokens": self.tokens, "seqlen": self.seqlen,
                "nll_sum": self.nll_sum, "windows": self.windows}


def check_window(index: int, windows: list[list[int]], nll: float) -> float:
    """`nll` of window `index`, or SFMPError naming the window if it is not finite (the
    first such window: the caller sums in order)."""
    if not math.isfinite(nll):
        start = sum(len(w) - 1 for w in windows[:index])
        raise SFMPError(f"window {index + 1} of {len(windows)} (scored tokens {start}.."
                        f"{start + len(windows[index]) - 2}): the negative log-likelihood is "
                        f"{nll}; the model's outputs are not finite (NaN/Inf in weights or "
                        "activations)")
    return nll


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise SFMPError(f"{p}: text file not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SFMPError(f"{p}: text file is empty")
    return text


def make_windows(token_ids: list[int], seqlen: int, bos_id: int | None,
                 max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of at most `seqlen` ids over the first `max_tokens` text tokens."""
    if seqlen < 2:
        raise SFMPError(f"--seqlen {seqlen}: must be at least 2")
    if max_tokens is not None and max_tokens < 2:
        raise SFMPError(f"--max-tokens {max_tokens}: must be at least 2")
    ids = list(token_ids[:max_tokens] if max_tokens is not None else token_ids)
    if len(ids) < 2:
        raise SFMPError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    if bos_id is None:
        windows = [ids[i:i + seqlen] for i in range(0, len(ids), seqlen)]
        return [w for w in windows if len(w) > 1]  # a lone trailing token has no context
    step = seqlen - 1
    return [[bos_id] + ids[i:i + step] for i in range(0, len(ids), step)]


def tokenize_windows(tokenizer, text: str, seqlen: int,
                     max_tokens: int | None = None) -> list[list[int]]:
    """Tokenize `text` once (no special tokens) and cut it with `make_windows`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return make_windows(ids, seqlen, tokenizer.bos_token_id, max_tokens)


def scored_tokens(windows: list[list[int]]) -> int:
    return sum(len(w) - 1 for w in windows)
