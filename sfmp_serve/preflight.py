"""The serving pre-check: everything about a checkpoint that vLLM would not notice.

vLLM loads what it finds: it does not insist on every parameter for quantized models (a missing
final norm starts and serves garbage), checks no values, and knows nothing of SFMP checksums.
`check_checkpoint` reads the checkpoint as the transformers loader does: checksums (unless
`verify=False`), every SFMP layer's structure, NaN/Inf in alpha/beta and in every unquantized
tensor, avg_bits and bits_per_weight against the tensors, and every parameter of the model of
config.json present at its shape. Errors name the file, layer and tensor.

`sfmp serve` runs it before starting vLLM (a one-line error instead of a traceback from deep in
vLLM's start-up) and tells the child so (PREFLIGHT_ENV); the vLLM plugin runs it when vLLM is
started directly (`vllm serve CKPT --quantization sfmp`), where SFMP_VERIFY=0 skips the checksums.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sfmp_serve.arch import arch_for
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

PREFLIGHT_ENV = "SFMP_PREFLIGHT_DONE"  # real path of the checkpoint `sfmp serve` checked
VERIFY_ENV = "SFMP_VERIFY"  # "0": the plugin's check skips the checksums


@dataclass(frozen=True)
class PreflightReport:
    path: Path
    model: str  # the transformers class the checkpoint was checked against
    tensors: int
    nbytes: int
    layers: int
    avg_bits: float  # recomputed from the tensors
    bits_per_weight: float
    verified: bool  # checksums compared
    seconds: float

    def summary(self) -> str:
        checks = "checksums verified" if self.verified else "checksums NOT verified"
        return (f"{self.path}: {self.tensors} tensors ({self.nbytes / 1e9:.3f} GB), "
                f"{self.layers} SFMP layers, {self.avg_bits:.3f} average bits, "
                f"{self.bits_per_weight:.3f} bits per weight, every parameter of {self.model} "
                f"present and finite, {checks} ({self.seconds:.2f} s)")


def check_checkpoint(path: str | os.PathLike, verify: bool = True) -> PreflightReport:
    """Read and check the checkpoint at `path` completely; FormatError/SFMPError otherwise."""
    return checked_checkpoint(path, verify)[1]


def checked_checkpoint(path: str | os.PathLike,
                       verify: bool = True) -> tuple[Checkpoint, PreflightReport]:
    """The checkpoint at `path`, read and checked completely, and what was checked."""
    from sfmp_serve.hf.model_check import check_complete, empty_model

    start = time.perf_counter()
    if not Path(path).is_dir():
        raise SFMPError(f"{path}: checkpoint directory not found")
    ckpt = load_checkpoint(path, validate=False, verify=verify)
    arch_for(ckpt.hf_config.get("model_type", "<missing model_type>"))
    model = empty_model(ckpt.path, ckpt.hf_config, ckpt.config.torch_act_dtype)
    shapes = check_complete(model, ckpt.config, {k: t.shape for k, t in ckpt.tensors.items()},
                            ckpt.files, ckpt.path)
    ckpt.validate(shapes)
    stats = ckpt.bit_stats()
    report = PreflightReport(
        Path(path), type(model).__name__, len(ckpt.tensors),
        sum(t.numel() * t.element_size() for t in ckpt.tensors.values()), len(shapes),
        stats.avg_bits, stats.bits_per_weight, verify, time.perf_counter() - start)
    log.info("%s", report.summary())
    return ckpt, report


def check_for_vllm(model: str) -> None:
    """The plugin's check, in vLLM's process, unless `sfmp serve` already made it."""
    path = Path(model)
    if not path.is_dir():
        log.warning("%s: not a local directory; the SFMP checks (checksums, completeness, "
                    "finite values) run only on local checkpoints", model)
        return
    if os.environ.get(PREFLIGHT_ENV) == os.path.realpath(path):
        return
    check_checkpoint(path, verify=os.environ.get(VERIFY_ENV, "1") != "0")
