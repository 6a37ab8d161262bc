"""GPTQ with SFMP's per-block bit-widths (pure math; no model, no I/O).

Lifecycle of one linear: Hessian H = 2 X^T X / n of its calibration inputs in the *reordered*
column order -> damping (percdamp x mean diagonal, retried x10 if H is not positive definite) ->
upper Cholesky factor of H^-1 -> columns quantized left to right with lazy batch updates. Each
(row, group) gets its asymmetric scale/zero from the group's weights at the moment the group
starts (so the group already carries the error feedback of every earlier column), and the
row's block bit-width. Error feedback therefore flows across the reordered columns: salient
columns come first and are compensated by the less salient ones.

`clip="fisher"` (the default): a group's range, when it starts, is shrunk by the ratio that
minimises the Fisher-weighted squared rounding error of its (error-fed) weights; "minmax" takes
the whole range, as GPTQ's reference quantizer does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from offline.quantizers.base import (LinearContext, QuantizedCodes, Quantizer, check_clip,
                                     check_positive, register, row_group_bits)
from offline.quantizers.blockwise import (group_slices, max_code, minmax_params,
                                          quantize_codes, weighted_clip_params)
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import LayerGeometry

log = logging.getLogger(__name__)


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n (float32 [K, K]) from calibration inputs X [n, K]."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    return (x.t() @ x).mul_(2.0 / x.shape[0])


def check_enough_tokens(n_tokens: int, in_features: int) -> None:
    """X^T X has rank <= n: with fewer tokens than columns H is singular by construction."""
    if n_tokens < in_features:
        raise SFMPError(f"GPTQ needs at least as many calibration tokens as input columns: got "
                        f"{n_tokens} tokens for {in_features} columns (raise --nsamples or "
                        f"--seqlen)")


def inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01,
                     retries: int = 3) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (so H^-1 = U^T U), float32.

    damp = percdamp * mean(diag H); if H + damp I is not positive definite the damping is
    multiplied by 10 (with a warning) up to `retries` times, then SFMPError.
    """
    h = hessian.to(torch.float64)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = percdamp * float(torch.diag(h).mean())
    for attempt in range(retries + 1):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper.to(torch.float32)
        if attempt < retries:
            log.warning("GPTQ: Hessian not positive definite with damping %.3g; retrying with "
                        "%.3g", damp, damp * 10)
            damp *= 10
    raise SFMPError(f"GPTQ: Hessian is not positive definite even with damping {damp:.3g} "
                    f"(percdamp {percdamp} x 10^{retries}); the calibration inputs are "
                    "degenerate (use more or more varied calibration samples)")


def _lazy_batches(geometry: LayerGeometry, blocksize: int) -> list[list[tuple[int, int]]]:
    """Whole groups packed into lazy-update batches of about `blocksize` columns.

    A batch never splits a group, so when a group starts all its columns already hold every
    earlier column's error feedback (its scale sees the weights GPTQ will actually quantize).
    """
    batches: list[list[tuple[int, int]]] = [[]]
    for g0, g1 in group_slices(geometry):
        if batches[-1] and g1 - batches[-1][0][0] > blocksize:
            batches.append([])
        batches[-1].append((g0, g1))
    return batches


def prepare_hessian(hessian: torch.Tensor, percdamp: float = 0.01,
                    retries: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead-input mask, upper Cholesky factor of the damped inverse) of a Hessian.

    Inputs that are always zero (diag 0) get diag 1: any weight on them is exact; GPTQ sets
    those weights to 0.
    """
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return dead, inverse_cholesky(h, percdamp, retries)


def gptq_quantize(weight: torch.Tensor, block_bits: torch.Tensor, geometry: LayerGeometry,
                  hessian: torch.Tensor | None, percdamp: float = 0.01,
                  blocksize: int = 128, retries: int = 3,
                  prepared: tuple[torch.Tensor, torch.Tensor] | None = None,
                  fisher: torch.Tensor | None = None) -> QuantizedCodes:
    """GPTQ on a reordered weight [N, K] with its Hessian [K, K] in the same column order.

    `prepared` (from prepare_hessian) skips the factorisation when several linears share H.
    `fisher` [N, K] (reordered): each group's range is clipped to minimise the Fisher-weighted
    rounding error (else min-max).
    """
    dead, hinv = prepared or prepare_hessian(hessian, percdamp, retries)
    w = weight.to(torch.float32).clone()
    hinv = hinv.to(w.device)
    w[:, dead.to(w.device)] = 0.0
    maxq = max_code(row_group_bits(block_bits, geometry)).to(w.device)  # [N, n_groups]
    codes = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    scale = torch.empty(maxq.shape, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    group = 0
    for batch in _lazy_batches(geometry, blocksize):
        i1, i2 = batch[0][0], batch[-1][1]
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        diag = torch.diag(h1).tolist()
        err1 = torch.empty_like(w1)
        for g0, g1 in batch:
            cols = slice(g0 - i1, g1 - i1)
            if fisher is None:
                s, z = minmax_params(w1[:, cols].amin(1), w1[:, cols].amax(1), maxq[:, group])
            else:
                s, z, _ = weighted_clip_params(w1[:, cols], fisher[:, g0:g1], maxq[:, group])
            scale[:, group], zero[:, group] = s, z
            for i in range(g0 - i1, g1 - i1):
                q = quantize_codes(w1[:, i], s, z, maxq[:, group])
                codes[:, i1 + i] = q
                err = (w1[:, i] - (q - z).mul_(s)).div_(diag[i])
                w1[:, i:].addr_(err, h1[i, i:], alpha=-1.0)  # feed the error forward
                err1[:, i] = err
            group += 1
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)  # lazy batch update
    return QuantizedCodes(codes=codes.to(torch.uint8), scale=scale, zero=zero)


@dataclass(frozen=True)
class GPTQConfig:
    percdamp: float = 0.01  # damping, as a fraction of the Hessian's mean diagonal
    blocksize: int = 128  # columns per lazy batch update
    damp_retries: int = 3  # times the damping is multiplied by 10 if H is not positive definite
    clip: str = "fisher"  # each group's range: Fisher-weighted clipping, or "minmax" (whole)

    def __post_init__(self) -> None:
        check_positive(self, "percdamp", "blocksize")
        check_clip(self)
        if self.damp_retries < 0:
            raise SFMPError(f"method.args.damp_retries={self.damp_retries!r}: must be >= 0")


@register
class GPTQQuantizer(Quantizer):
    """The `gptq` method: Hessian error feedback on the target's calibration inputs."""

    name = "gptq"
    needs_inputs = True
    Config = GPTQConfig

    def __init__(self, config: GPTQConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        # Targets of one input group share one input tensor: factorise its Hessian once.
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, block_bits: torch.Tensor,
                 geometry: LayerGeometry, context: LinearContext) -> QuantizedCodes:
        context.require_inputs("gptq")
        x = context.inputs.reshape(-1, context.inputs.shape[-1])
        check_enough_tokens(x.shape[0], geometry.in_features)
        cfg = self.config
        if self._cache is None or self._cache[0] is not context.inputs:
            dead, hinv = prepare_hessian(hessian_from_inputs(x), cfg.percdamp, cfg.damp_retries)
            self._cache = (context.inputs, dead, hinv)
        fisher = self.target_fisher(context).to(weight.device) if self.needs_fisher else None
        return gptq_quantize(weight, block_bits, geometry, None, blocksize=cfg.blocksize,
                             prepared=self._cache[1:], fisher=fisher)
