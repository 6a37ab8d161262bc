"""The model card (README.md) written into every checkpoint: what it is, how it was made, how to
run it. Hugging Face reads the YAML front matter (base model, library, tags); people read the
rest. Everything in it comes from the checkpoint's config and recipe, plus numbers the user
measured and passed in (`metrics`), so the same run always writes the same card.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from sfmp_serve import __version__
from sfmp_serve.format import SFMPConfig
from sfmp_serve.recipe import RECIPE_FILE, Recipe


def _base_model(model_dir: str | os.PathLike, hf_config: Mapping[str, Any]) -> str:
    name = hf_config.get("_name_or_path")
    return str(name) if name and not Path(str(name)).is_absolute() else Path(model_dir).name


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _method_line(config: SFMPConfig, recipe: Recipe) -> str:
    args = ", ".join(f"{k}={v}" for k, v in recipe.method.args.items())
    allocation = "uniform (one width)" if recipe.uniform else "Fisher salience, search-free"
    return f"`{config.method}`" + (f" ({args})" if args else "") + f"; allocation: {allocation}"


def _calibration_line(config: SFMPConfig) -> str:
    cal = config.calibration
    if cal.get("source") == "none":
        return "none (no salience, no calibrated method)"
    return (f"`{Path(str(cal['source'])).name}`, {cal['nsamples']} x {cal['seqlen']} tokens, "
            f"seed {cal['seed']}")


def _overrides_line(config: SFMPConfig, recipe: Recipe) -> str:
    parts = [f"ignored (kept in the original dtype): `{p}`" for p in recipe.overrides.ignore]
    parts += [f"pinned to {b} bits: `{p}`" for p, b in recipe.overrides.pin]
    return "; ".join(parts) if parts else "none"


def model_card(name: str, model_dir: str | os.PathLike, hf_config: Mapping[str, Any],
               config: SFMPConfig, recipe: Recipe, size_bytes: int, shards: int,
               metrics: Mapping[str, Any] | None = None) -> str:
    """README.md of checkpoint directory `name` quantized from `model_dir`."""
    base = _base_model(model_dir, hf_config)
    target = "" if config.target_bits is None else f" (target {config.target_bits:g})"
    files = "1 file" if shards == 1 else f"{shards} shards + model.safetensors.index.json"
    lines = [
        "---", f"base_model: {base}", "library_name: transformers", "tags:", "- sfmp",
        "- quantized", "- mixed-precision", "---", "",
        f"# {name}", "",
        f"`{base}` with its decoder linears quantized by SFMP (search-free, fine-grained "
        f"mixed-precision weight quantization) to {config.avg_bits:.4f} average code bits: "
        "every block of "
        f"{config.block_rows} outputs x {config.group_size} inputs has its own bit-width, the "
        "most salient blocks the most bits. Made with sfmp-serve "
        f"{__version__}; the format is version {config.format_version} of sfmp-serve's "
        "(docs/format.md).", "",
        "| | |", "|---|---|",
        f"| average code bits | {config.avg_bits:.4f}{target} |",
        f"| stored bits per weight (codes + scales + tables) | {config.bits_per_weight:.4f} |",
        f"| bit-widths | {', '.join(map(str, config.bit_choices))} |",
        f"| quantized linears | {len(config.quantized_modules)} |",
        f"| overrides | {_overrides_line(config, recipe)} |",
        f"| weights | {_size(size_bytes)} in {files} |",
        f"| method | {_method_line(config, recipe)} |",
        f"| calibration | {_calibration_line(config)} |",
        f"| activations | {config.act_dtype} |", "",
    ]
    if metrics:
        lines += ["## Measured", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
        lines += ["", "Numbers as given to `sfmp quantize --card-metric` by whoever made it.",
                  ""]
    lines += [
        "## Serve it with vLLM", "", "```bash",
        "pip install sfmp-serve        # registers the `sfmp` quantization plugin with vLLM",
        f"vllm serve ./{name} --quantization sfmp    # CUDA build of vLLM",
        f"sfmp serve ./{name} --port 8000            # any build (CPU included), checks first",
        "```", "",
        "## Load it in transformers", "", "```python",
        "import sfmp_serve.hf  # registers the format; without it from_pretrained refuses",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("./{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("./{name}")',
        "```", "",
        "## Reproduce", "",
        f"The recipe is in [{RECIPE_FILE}]({RECIPE_FILE}); the same model and recipe give the "
        "same tensors:", "", "```bash",
        f"sfmp quantize {base} --recipe {name}/{RECIPE_FILE} --out {name}", "```", "",
        "```yaml", recipe.dump().rstrip("\n"), "```", "",
    ]
    return "\n".join(lines)
