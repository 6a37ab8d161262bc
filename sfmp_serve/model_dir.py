"""Checks of a plain Hugging Face model directory before transformers reads it.

transformers and safetensors report bad input with their own exceptions (a truncated file, a
config whose hidden size does not divide into its heads, a pickle-only directory), and those
reach the user as tracebacks. `check_model_dir` looks at everything they would trip over and
raises one SFMPError naming the file; readers of model directories (`sfmp quantize`,
`sfmp eval ppl`) call it first and wrap transformers' own loading with `load_error`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sfmp_serve.arch import ARCHITECTURES, ArchSpec, find_arch
from sfmp_serve.errors import FormatError, SFMPError, one_line
from sfmp_serve.experts import unroll_experts
from sfmp_serve.format import all_finite, read_hf_config
from sfmp_serve.shards import INDEX_FILE
from sfmp_serve.weights_file import read_header

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def check_causal_lm_config(path: Path, hf_config: dict[str, Any]) -> None:
    architectures = hf_config.get("architectures") or []
    if not isinstance(architectures, list):
        raise SFMPError(f"{path}/config.json: architectures must be a list, got "
                        f"{architectures!r}")
    if architectures and not set(architectures) & causal_lm_class_names():
        raise SFMPError(f"{path}: not a causal LM (architectures: "
                        f"{', '.join(map(str, architectures))})")


def transformers_config(path: Path, hf_config: dict[str, Any]):
    """transformers' config object of config.json; its validation errors as one line."""
    from transformers import AutoConfig

    values = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    model_type = values.pop("model_type", None)
    if not model_type:
        raise SFMPError(f"{path}/config.json: no model_type, cannot tell the architecture")
    try:
        return AutoConfig.for_model(model_type, **values)
    except Exception as e:  # transformers validates with several exception types
        raise SFMPError(f"{path}/config.json: transformers cannot use this config "
                        f"({one_line(e)})") from e


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, every one of them readable (headers)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
        if pickles:
            raise SFMPError(f"{path}: weights only in pickle form ({', '.join(pickles)}); "
                            "sfmp reads safetensors only (pickle files can run code when "
                            "loaded): convert them with transformers' save_pretrained")
        raise SFMPError(f"{path}: no weights (*.safetensors) in the model directory")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SFMPError(f"{index}: not a valid safetensors index ({one_line(e)})") from e
        missing = sorted(n for n in named if not (path / str(n)).is_file())
        if missing:
            raise SFMPError(f"{index}: names {missing[0]}, which is not in the directory")
    for f in files:
        read_header(f)  # FormatError naming the file if it is damaged or truncated
    return files


def empty_model(path: Path, hf_config: Mapping[str, Any], dtype: torch.dtype) -> nn.Module:
    """The causal LM of config.json with meta parameters, real (computed) buffers and its
    embeddings tied when the config says so: its names and shapes, at no memory cost. The
    experts of a mixture-of-experts family of sfmp_serve.arch are unrolled into one linear per
    expert and projection, as checkpoints store them (sfmp_serve.experts)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = transformers_config(path, dict(hf_config))
    try:
        # Buffers such as rotary inv_freq are computed in __init__; keep them off the meta device.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # transformers refuses configs it has no causal LM for, in many ways
        raise SFMPError(f"{path}/config.json: transformers cannot build a causal LM from it "
                        f"({one_line(e)})") from e
    model.tie_weights()
    spec = find_arch(hf_config.get("model_type"))
    if spec is not None:
        unroll_experts(model, spec)
    return model


def model_spec(model: nn.Module) -> ArchSpec | None:
    """The architecture table's entry of a transformers model, if it has one."""
    return find_arch(getattr(getattr(model, "config", None), "model_type", None))


def module_name(model: nn.Module, name: str) -> str:
    """The model's name of a module the checkpoint calls `name` (Mixtral's block_sparse_moe
    is transformers' mlp); a model name is returned as it is."""
    spec = model_spec(model)
    return name if spec is None else spec.model_key(name)


def _shape(dims: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


def check_stored(model: nn.Module, stored: Mapping[str, Sequence[int]],
                 files: Mapping[str, Path], path: Path, skip: Set[str] = frozenset(),
                 strict: bool = True) -> None:
    """Every parameter of `model` (but `skip`) is in `stored` ({name: shape}, held in `files`,
    of the directory `path`) at the model's shape; strict: and nothing else is stored.
    Names are the checkpoint's (ArchSpec.stored_key of the model's). SFMPError naming the file
    and tensor."""
    def at(key: str) -> str:
        return f"{files.get(key, path)}: tensor {key}"

    spec = model_spec(model)
    stored_key = spec.stored_key if spec is not None else (lambda k: k)
    name = type(model).__name__
    expected = {stored_key(k): tuple(t.shape) for k, t in model.state_dict().items()}
    expected = {k: shape for k, shape in expected.items() if k not in skip}
    for key in sorted(stored):
        if key not in expected:
            if strict:
                raise FormatError(f"{at(key)}: not a parameter of the {name} model of "
                                  "config.json")
        elif tuple(stored[key]) != expected[key]:
            raise FormatError(f"{at(key)}: shape {_shape(stored[key])} in the checkpoint, "
                              f"{_shape(expected[key])} in the {name} model of config.json")
    # A tied parameter (lm_head tied to the embeddings) is stored once, under its source's name;
    # before transformers ties them, a model still lists both.
    tied = {stored_key(k) for k in getattr(model, "all_tied_weights_keys", None) or {}}
    params = [stored_key(n) for n, _ in model.named_parameters()]
    missing = [n for n in params if n not in skip and n not in tied and n not in stored]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FormatError(f"{at(missing[0])}: missing from the checkpoint (the {name} model of "
                          f"config.json has it){more}")


def check_model_dir(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a readable causal LM directory with safetensors weights; SFMPError
    naming the file for anything transformers would fail on with a traceback. For the
    architectures of sfmp_serve.arch (whose checkpoint names the table knows), also every
    parameter stored at its shape: transformers would initialise a missing one at random and
    carry on."""
    path = Path(model_dir)
    if not path.is_dir():
        raise SFMPError(f"{path}: model directory does not exist")
    hf_config = read_hf_config(path)
    check_causal_lm_config(path, hf_config)
    transformers_config(path, hf_config)
    files = weight_files(path)
    if any(hf_config.get("model_type") in spec.model_types for spec in ARCHITECTURES):
        stored, where = {}, {}
        for f in files:
            for key, (_, shape) in read_header(f).items():
                stored[key], where[key] = shape, f
        check_stored(empty_model(path, hf_config, torch.float32), stored, where, path,
                     strict=False)
    return hf_config


def load_error(path: Path, e: Exception) -> SFMPError:
    """What transformers raised while loading `path`, as one line."""
    return SFMPError(f"{path}: cannot load the model ({one_line(e)})")


def check_finite(model: nn.Module, where: str = "") -> None:
    """NaN/Inf in any weight makes every result meaningless: name the tensor."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta and not all_finite(tensor):
            raise SFMPError(f"{where}weight {name} contains NaN or Inf")
