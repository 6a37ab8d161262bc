"""Salience: the diagonal of the empirical Fisher information of every decoder linear weight.

F_ii = sum over calibration sequences of (d loss_seq / d w_i)^2, with loss_seq the mean LM loss
of one sequence. Each backward pass sees one sequence, so each square is a per-sample square as
the Fisher requires (squaring a batch-summed gradient would add cross terms). Computed in float32:
bf16 gradients are too coarse to rank weights. A routed expert's weights get a gradient only
from the tokens routed to it, so an expert that is rarely used ranks low on its own evidence
(one that is never used has zero salience).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from offline.targets import TargetSet
from sfmp_serve.errors import SFMPError, one_line

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda"):
        raise SFMPError(f"--device={device!r}: expected 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise SFMPError("--device=cuda: no CUDA device is available (use --device cpu)")
    return torch.device(device)


@contextmanager
def grads_only_for(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Compute gradients for `weights` only (no embedding/lm_head grads), restored afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


def fisher_diagonal(model: nn.Module, targets: TargetSet, tokens: torch.Tensor,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Squared per-sequence gradients of the LM loss, summed, for each target's weight.

    model must be float32 and already on `device`; returns float32 CPU tensors [out, in].
    """
    device = torch.device(device)
    weights = targets.weights(model)
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    model.eval()  # no dropout: the gradient of the model being quantized
    with grads_only_for(model, list(weights.values())):
        for seq in tqdm(tokens, desc="salience (fisher)", unit="seq", leave=False):
            ids = seq[None].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            for name, w in weights.items():
                if w.grad is not None:  # None: an expert no token of this sequence reached
                    fisher[name].addcmul_(w.grad, w.grad)
                w.grad = None
    out = {}
    for name, f in fisher.items():
        if not torch.isfinite(f).all():
            raise SFMPError(f"salience of {name} contains NaN or Inf (the loss or its "
                            "gradient overflowed on the calibration data)")
        out[name] = f.cpu()
    log.info("salience: Fisher diagonal of %d targets over %d sequences", len(out),
             tokens.shape[0])
    return out


def save_salience(path: str | Path, salience: dict[str, torch.Tensor],
                  key: dict[str, object]) -> None:
    """Store a Fisher diagonal with what it was computed from (model, calibration)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in salience.items()}, str(tmp),
                  metadata={"sfmp_salience_key": json.dumps(key, sort_keys=True)})
        os.replace(tmp, path)
    except Exception as e:  # safetensors reports a failed write as its own type
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise SFMPError(f"--salience-cache {path}: cannot write ({one_line(e)})") from e
    log.info("salience: saved to %s", path)


def load_salience(path: str | Path, key: dict[str, object],
                  targets: TargetSet) -> dict[str, torch.Tensor]:
    """A cached Fisher diagonal; an error if it was computed from anything else."""
    if Path(path).is_dir():
        raise SFMPError(f"--salience-cache {path}: is a directory; pass a file path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = json.loads((handle.metadata() or {}).get("sfmp_salience_key", "null"))
            salience = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as e:  # safetensors raises several types for a file it cannot parse
        raise SFMPError(f"--salience-cache {path}: not a salience file written by "
                        f"`sfmp quantize` ({one_line(e)}); delete it or pass another path") \
            from e
    if stored != json.loads(json.dumps(key, sort_keys=True)):
        raise SFMPError(f"--salience-cache {path}: computed from {stored}, not from "
                        f"{key}; delete it or pass another file")
    for name, shape in targets.shapes().items():
        if name not in salience or tuple(salience[name].shape) != shape:
            raise SFMPError(f"--salience-cache {path}: no salience of shape {shape} for {name}")
    log.info("salience: loaded from %s", path)
    return salience
