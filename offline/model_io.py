"""Load a Hugging Face causal LM directory and resolve its quantization targets (offline.targets).

The model is loaded in the dtype it was saved in (to remember every tensor's original dtype and
the activation dtype), then converted to float32 for calibration, salience and quantization.
`load_streamed` is the low-memory form: everything outside the decoder layers in float32, the
layers on the meta device, read one at a time from the safetensors files when a stage needs them.
The experts of a mixture-of-experts model are unrolled into one linear per expert and
projection (sfmp_serve.experts) right after loading. Tensor names in LoadedModel (`read`,
`orig_dtypes`) are the checkpoint's; modules are reached by the model's names.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from offline.streaming import SafetensorsSource, load_skeleton
from offline.targets import TargetSet, decoder_layers, find_targets
from sfmp_serve.arch import ArchSpec, arch_for
from sfmp_serve.errors import SFMPError, one_line
from sfmp_serve.experts import unroll_experts
from sfmp_serve.format import ACT_DTYPES, read_hf_config
from sfmp_serve.model_dir import (check_causal_lm_config, check_finite, check_model_dir,
                                  load_error)

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A float32 causal LM plus what the pipeline needs to know about its checkpoint."""

    path: Path
    hf_config: dict[str, Any]  # config.json as saved (all keys kept)
    spec: ArchSpec
    model: nn.Module  # float32, eval mode
    targets: TargetSet  # what gets quantized, in model order
    orig_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # checkpoint key -> dtype
    act_dtype: torch.dtype = torch.float32
    # Set by load_streamed: the decoder layers are on meta and are read from here per use.
    source: SafetensorsSource | None = None

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Full names of the targets sharing one input."""
        return self.targets.groups

    @property
    def streamed(self) -> bool:
        return self.source is not None

    def read(self, key: str) -> torch.Tensor:
        """A tensor by its checkpoint name, in its stored dtype (from the checkpoint if
        streamed)."""
        if self.source is not None and key in self.source:
            return self.source.read([key])[key]
        owner, _, attr = self.spec.model_key(key).rpartition(".")  # parameter or buffer
        tensor = getattr(self.model.get_submodule(owner), attr)
        return tensor.detach().to(self.orig_dtypes.get(key, tensor.dtype))

    @contextmanager
    def on_device(self, device: torch.device | str) -> Iterator[nn.Module]:
        """The model on `device` for the block, then back on the CPU. Streamed decoder layers
        stay on meta (the stages that run them materialise one at a time)."""
        layers = decoder_layers(self.model, self.spec)
        parent_path, _, attr = self.spec.layers_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model

        def move(target: torch.device | str) -> None:
            if self.source is None:
                self.model.to(target)
                return
            setattr(parent, attr, nn.ModuleList())  # meta tensors cannot be moved
            try:
                self.model.to(target)
            finally:
                setattr(parent, attr, layers)

        move(device)
        try:
            yield self.model
        finally:
            move("cpu")


def check_causal_lm(path: Path, hf_config: dict[str, Any]) -> ArchSpec:
    """Reject configs that are not causal LMs, already quantized, or of an unknown family."""
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method", "?")
        raise SFMPError(f"{path}: model is already quantized (quant_method '{method}'); "
                        "quantize the unquantized checkpoint")
    check_causal_lm_config(path, hf_config)
    model_type = hf_config.get("model_type")
    if not model_type:
        raise SFMPError(f"{path}/config.json: no model_type, cannot tell the architecture")
    return arch_for(model_type)


def _checked_dir(model_dir: str | os.PathLike) -> tuple[Path, dict[str, Any], ArchSpec]:
    """(path, config.json, arch spec) of a causal LM directory, or SFMPError."""
    path = Path(model_dir)
    if not path.is_dir():
        raise SFMPError(f"{path}: model directory does not exist")
    hf_config = read_hf_config(path)
    spec = check_causal_lm(path, hf_config)
    check_model_dir(path)  # config, safetensors readable and complete: before transformers
    return path, hf_config, spec


def _checked_act_dtype(path: Path, dtype: torch.dtype) -> torch.dtype:
    if dtype not in ACT_DTYPES.values():
        raise SFMPError(f"{path}: weights are {dtype}; expected float16, bfloat16 or float32")
    return dtype


def load_model(model_dir: str | os.PathLike) -> LoadedModel:
    """Load MODEL_DIR as a float32 causal LM; SFMPError for every unusable input."""
    path, hf_config, spec = _checked_dir(model_dir)
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    except Exception as e:  # the files passed the checks above; what is left is transformers'
        raise load_error(path, e) from e
    unroll_experts(model, spec)
    orig_dtypes = {spec.stored_key(k): v.dtype for k, v in model.state_dict().items()}
    check_finite(model)
    targets = find_targets(model, spec)
    act_dtype = _checked_act_dtype(path, orig_dtypes[f"{next(iter(targets)).name}.weight"])
    model = model.float().eval()
    log.info("loaded %s: %d quantization targets, weights in %s", path, len(targets), act_dtype)
    return LoadedModel(path, hf_config, spec, model, targets, orig_dtypes, act_dtype)


def load_streamed(model_dir: str | os.PathLike) -> LoadedModel:
    """Like load_model, but only what lives outside the decoder layers is read into memory
    (their NaN/Inf check happens as each layer is read)."""
    path, hf_config, spec = _checked_dir(model_dir)
    try:
        model, source = load_skeleton(path, spec)
    except SFMPError:
        raise
    except Exception as e:  # the files passed the checks above; what is left is transformers'
        raise load_error(path, e) from e
    targets = find_targets(model, spec)
    stored = (spec.stored_key(k) for k in model.state_dict())
    orig_dtypes = {k: source.dtype(k) for k in stored if k in source}
    act_dtype = _checked_act_dtype(path, orig_dtypes[f"{next(iter(targets)).name}.weight"])
    log.info("streaming %s: %d quantization targets, weights in %s, decoder layers read per "
             "use", path, len(targets), act_dtype)
    return LoadedModel(path, hf_config, spec, model, targets, orig_dtypes, act_dtype, source)


def load_tokenizer(model_dir: str | os.PathLike):
    """The model's tokenizer (needed for text calibration)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # tokenizers fail with several exception types on damaged files
        raise SFMPError(f"{model_dir}: cannot load the tokenizer ({one_line(e)})") from e
