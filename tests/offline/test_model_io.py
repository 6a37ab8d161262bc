"""Loading a model directory: linears found through the architecture table, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline.model_io import load_model
from sfmp_serve.errors import SFMPError


def test_finds_every_target_and_input_group(tiny_qwen3):
    loaded = load_model(tiny_qwen3)
    assert len(loaded.targets) == 2 * 7
    assert "model.layers.1.mlp.down_proj" in loaded.targets
    down = loaded.targets["model.layers.1.mlp.down_proj"]
    assert (down.layer, down.local, down.capture) == (1, "mlp.down_proj", "mlp.down_proj")
    assert (down.out_features, down.in_features, down.has_bias) == (80, 176, False)
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj") in loaded.input_groups
    assert loaded.act_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_bf16_model_keeps_its_dtypes(tmp_path):
    from tests.tiny import make_tiny_model
    loaded = load_model(make_tiny_model(tmp_path / "m", dtype=torch.bfloat16))
    assert loaded.act_dtype == torch.bfloat16
    assert loaded.orig_dtypes["model.norm.weight"] == torch.bfloat16
    assert loaded.model.model.norm.weight.dtype == torch.float32  # computed in fp32


def config_dir(tmp_path, **config):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config,match", [
    ({"model_type": "bert", "architectures": ["BertModel"]}, "not a causal LM"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     "architecture 'gpt2' is not supported"),
    ({"model_type": "llama", "quantization_config": {"quant_method": "awq"}},
     "already quantized"),
])
def test_unusable_configs(tmp_path, config, match):
    with pytest.raises(SFMPError, match=match):
        load_model(config_dir(tmp_path, **config))


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(SFMPError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(SFMPError, match="no config.json"):
        load_model(tmp_path)


def test_nan_weight_is_named(tmp_path, tiny_llama):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"][1, 2] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SFMPError, match="model.layers.0.self_attn.v_proj.weight contains NaN"):
        load_model(broken)
