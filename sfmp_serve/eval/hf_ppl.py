"""Perplexity of a transformers model (plain HF directory or SFMP checkpoint) on the windows."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from sfmp_serve.errors import SFMPError, one_line
from sfmp_serve.eval.windows import PplResult, check_window, scored_tokens
from sfmp_serve.format import is_sfmp_checkpoint, read_hf_config
from sfmp_serve.model_dir import check_finite, check_model_dir, load_error

log = logging.getLogger(__name__)


def load_model_and_tokenizer(path: str | os.PathLike, device: str = "cpu",
                             dtype: torch.dtype | None = None, packed: bool = False):
    """(model, tokenizer) of an HF directory or an SFMP checkpoint, in eval mode.

    An SFMP checkpoint's linears are dequantized once at load (the same weight values and
    float32 accumulation as the packed op, several times faster on long windows) unless
    `packed`, which runs the packed reference op in every forward.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    read_hf_config(path)  # one-line error for a missing directory or config.json
    if is_sfmp_checkpoint(path):
        from sfmp_serve.hf import load_sfmp_model
        model = load_sfmp_model(path, device=device, dtype=dtype, dequantized=not packed)
    else:
        check_model_dir(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto",
                                                         use_safetensors=True)
        except Exception as e:  # the files passed check_model_dir; what is left is transformers'
            raise load_error(path, e) from e
        check_finite(model, f"{path}: ")
        model = model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers fail with several exception types on bad files
        raise SFMPError(f"{path}: cannot load the tokenizer ({one_line(e)})") from e
    return model.eval(), tokenizer


@torch.no_grad()
def window_nll(model, ids: list[int]) -> float:
    """Summed NLL (nats) of positions 1.. of one window, log-softmax in float32."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    logits = model(input_ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return -float(logprobs.gather(1, input_ids[0, 1:, None]).sum())


def hf_perplexity(model, windows: list[list[int]], seqlen: int,
                  progress: bool = True) -> PplResult:
    """Perplexity over `windows`; SFMPError naming the first window whose loss is not finite."""
    nll = 0.0
    for i, ids in enumerate(tqdm(windows, desc="ppl (HF)", unit="window",
                                 disable=not progress)):
        nll += check_window(i, windows, window_nll(model, ids))
    return PplResult.from_nll(nll, scored_tokens(windows), seqlen, len(windows))
