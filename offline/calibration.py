"""Calibration token sequences: from a text file, a hub dataset, or sampled from the model itself.

Every source yields a LongTensor [nsamples, seqlen] that depends only on (source, seed). Text
sources are tokenized as one concatenation and cut into nsamples random windows; the default,
data-free source samples sequences from the model, starting from BOS, with a seeded generator.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sfmp_serve.errors import SFMPError

log = logging.getLogger(__name__)

MODEL_SAMPLES = "model-samples"  # the name the config records for data-free calibration
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class CalibrationSpec:
    source: str | None  # None: data-free; a file path; or "hf:NAME[:CONFIG[:SPLIT]]"
    nsamples: int
    seqlen: int
    seed: int = 0
    # Sequences generated together in data-free mode: a decode step reads every weight once, so
    # on a CPU a batch of 32 costs little more than a batch of 1.
    batch_size: int = 32

    def __post_init__(self) -> None:
        for key in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, key) <= 0:
                raise SFMPError(f"--{key}={getattr(self, key)}: must be a positive integer")

    def describe(self) -> dict[str, Any]:
        """What the checkpoint records about its calibration."""
        return {"source": self.source or MODEL_SAMPLES, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed}


# --------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------
def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFMPError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SFMPError(f"{path}:{lineno}: expected an object with a string 'text' field")
            texts.append(record["text"])
    return texts


def _parquet_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise SFMPError(f"{path}: cannot read parquet file ({e})") from e
    if "text" not in table.column_names:
        raise SFMPError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def read_text_file(path: Path) -> list[str]:
    """The texts of a .txt, .jsonl ("text" field) or .parquet ("text" column) file."""
    if not path.is_file():
        raise SFMPError(f"{path}: calibration file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_texts(path)
    if suffix == ".parquet":
        return _parquet_texts(path)
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    raise SFMPError(f"{path}: unsupported calibration file type '{suffix}' "
                    f"(expected {', '.join(TEXT_SUFFIXES)} or hf:NAME[:CONFIG[:SPLIT]])")


def read_hub_texts(source: str) -> list[str]:
    """Texts of a `datasets` dataset named hf:NAME[:CONFIG[:SPLIT]] ("text" column)."""
    parts = source[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise SFMPError(f"--calib {source}: expected hf:NAME[:CONFIG[:SPLIT]]")
    parts += [""] * (3 - len(parts))
    name, config, split = parts[0], parts[1] or None, parts[2] or "train"
    try:
        import datasets
    except ImportError as e:
        raise SFMPError(f"--calib {source}: the 'datasets' package is not installed "
                        "(pip install 'sfmp-serve[hub]')") from e
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing dataset, bad config: all one user error
        raise SFMPError(f"--calib {source}: cannot load dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from e
    if "text" not in data.column_names:
        raise SFMPError(f"--calib {source}: no 'text' column "
                        f"(columns: {', '.join(data.column_names)})")
    return [t for t in data["text"] if isinstance(t, str)]


def text_windows(token_ids: list[int], nsamples: int, seqlen: int, seed: int,
                 where: str) -> torch.Tensor:
    """nsamples random windows of seqlen tokens (seeded) from one token stream."""
    if not token_ids:
        raise SFMPError(f"{where}: calibration text is empty")
    if len(token_ids) < seqlen:
        raise SFMPError(f"{where}: calibration text is too short: {len(token_ids)} tokens, "
                        f"need at least --seqlen={seqlen}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(token_ids) - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def text_calibration(spec: CalibrationSpec, tokenizer) -> torch.Tensor:
    """Windows from a file or hub dataset: tokenize the concatenation, sample windows."""
    source = spec.source or ""
    texts = read_hub_texts(source) if source.startswith("hf:") else read_text_file(Path(source))
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise SFMPError(f"{source}: calibration text is empty")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return text_windows(ids, spec.nsamples, spec.seqlen, spec.seed, source)


# --------------------------------------------------------------------------------------------
# Data-free: sample from the model
# --------------------------------------------------------------------------------------------
def start_token(hf_config: dict[str, Any]) -> int:
    """BOS, or EOS for models without one (GPT-style documents start after an EOS)."""
    for key in ("bos_token_id", "eos_token_id"):
        value = hf_config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    raise SFMPError("config.json has neither bos_token_id nor eos_token_id: cannot start "
                    "data-free calibration; pass --calib FILE")


def banned_tokens(hf_config: dict[str, Any]) -> list[int]:
    """End/pad tokens are never sampled, so every sequence stays one running text."""
    banned: set[int] = set()
    for key in ("eos_token_id", "pad_token_id"):
        value = hf_config.get(key)
        banned.update(v for v in (value if isinstance(value, list) else [value])
                      if isinstance(v, int))
    return sorted(banned)


@torch.no_grad()
def _sample_batch(model: nn.Module, batch: int, seqlen: int, bos: int, banned: list[int],
                  gen: torch.Generator, device: torch.device, bar: tqdm) -> torch.Tensor:
    """Multinomial sampling at temperature 1 with a KV cache, `batch` sequences at once."""
    from transformers.cache_utils import DynamicCache
    tokens = torch.full((batch, seqlen), bos, dtype=torch.long)
    cache = DynamicCache()
    step_input = tokens[:, :1].to(device)
    for t in range(1, seqlen):
        out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float().cpu()
        logits[:, banned] = float("-inf")
        # Sampling on the CPU with a CPU generator makes the result device-independent.
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        tokens[:, t] = nxt[:, 0]
        step_input = nxt.to(device)
        bar.update(batch)
    return tokens


def sample_from_model(model: nn.Module, hf_config: dict[str, Any], spec: CalibrationSpec,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Data-free calibration: nsamples sequences of seqlen tokens generated by the model."""
    bos, banned = start_token(hf_config), banned_tokens(hf_config)
    gen = torch.Generator().manual_seed(spec.seed)
    out = []
    with tqdm(total=spec.nsamples * (spec.seqlen - 1), desc="calibration (sampling)",
              unit="tok", leave=False) as bar:
        for first in range(0, spec.nsamples, spec.batch_size):
            batch = min(spec.batch_size, spec.nsamples - first)
            out.append(_sample_batch(model, batch, spec.seqlen, bos, banned, gen,
                                     torch.device(device), bar))
    return torch.cat(out)


def calibration_tokens(spec: CalibrationSpec, model: nn.Module, hf_config: dict[str, Any],
                       tokenizer_loader, device: torch.device | str = "cpu") -> torch.Tensor:
    """LongTensor [nsamples, seqlen] for any source; `tokenizer_loader()` is called if needed."""
    if spec.source is None:
        tokens = sample_from_model(model, hf_config, spec, device)
    else:
        tokens = text_calibration(spec, tokenizer_loader())
    log.info("calibration: %d x %d tokens from %s", tokens.shape[0], tokens.shape[1],
             spec.source or MODEL_SAMPLES)
    return tokens
