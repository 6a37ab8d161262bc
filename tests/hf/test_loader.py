"""load_sfmp_model / quantize_in_memory / from_pretrained against each other and the oracle."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from sfmp_serve.errors import FormatError
from sfmp_serve.hf import SFMPLinear, load_sfmp_model, quantize_in_memory
from sfmp_serve.ops.reference import dequantize
from tests.corrupt import resigned_copy
from tests.hf.checkpoints import make_sfmp_checkpoint
from tests.tiny import make_tiny_model

IDS = torch.tensor([[0, 5, 17, 99, 250, 3, 42, 7, 300, 11, 64, 128]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_loaded_equals_in_memory(arch, request):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    ckpt = request.getfixturevalue(f"{arch}_ckpt")
    loaded = load_sfmp_model(ckpt.path)
    in_memory = quantize_in_memory(AutoModelForCausalLM.from_pretrained(model_dir),
                                   ckpt.packed, ckpt.config)
    n_sfmp = sum(isinstance(m, SFMPLinear) for m in loaded.modules())
    assert n_sfmp == len(ckpt.config.quantized_modules) > 0
    assert torch.equal(logits(loaded), logits(in_memory))


def test_loaded_matches_dequantized_dense_model(tiny_llama, llama_ckpt):
    """Independent oracle: the dense weights `dequantize` rebuilds, in a plain HF model."""
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for name, packed in llama_ckpt.packed.items():
            dense.get_submodule(name).weight.copy_(dequantize(packed, llama_ckpt.config))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    got, want = logits(load_sfmp_model(llama_ckpt.path)), logits(dense)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and quantization changed the function: the test would notice a loader that ignores SFMP
    assert (got - logits(original)).abs().max() > 1e-2


def test_tied_embeddings_and_buffers_only(llama_ckpt):
    model = load_sfmp_model(llama_ckpt.path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert not any(n.endswith("weight") for n, _ in q.named_parameters())
    assert q.qweight.dtype == torch.int32
    assert model.generation_config.eos_token_id == 1


def test_from_pretrained_registered(llama_ckpt):
    model = AutoModelForCausalLM.from_pretrained(llama_ckpt.path)
    assert isinstance(model.get_submodule("model.layers.1.mlp.down_proj"), SFMPLinear)
    assert torch.equal(logits(model), logits(load_sfmp_model(llama_ckpt.path)))


def test_bf16_checkpoint(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama", dtype=torch.bfloat16, layers=1)
    ckpt = make_sfmp_checkpoint(model_dir, tmp_path / "ckpt")
    assert ckpt.config.act_dtype == "bfloat16"
    model = load_sfmp_model(ckpt.path)
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert logits(load_sfmp_model(ckpt.path, dtype=torch.float32)).dtype == torch.float32


def _corrupt(ckpt_path, tmp_path, edit):
    """Structural damage with valid checksums: what only the structural checks can catch."""
    return resigned_copy(ckpt_path, tmp_path / "bad", edit)


LAYER = "model.layers.1.self_attn.k_proj"


def _swap_first_two(t):
    t = t.clone()
    t[0], t[1] = t[1].clone(), t[0].clone()
    return t


CORRUPTIONS = {
    "qweight": lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:-3]}),
    "input_perm": lambda t: t.update({f"{LAYER}.input_perm":
                                      torch.zeros_like(t[f"{LAYER}.input_perm"])}),
    "block_offsets": lambda t: t.update({f"{LAYER}.block_offsets":
                                         _swap_first_two(t[f"{LAYER}.block_offsets"])}),
    "block_bits": lambda t: t.update({f"{LAYER}.block_bits":
                                      torch.full_like(t[f"{LAYER}.block_bits"], 7)}),
    "alpha": lambda t: t.update({f"{LAYER}.alpha": t[f"{LAYER}.alpha"][:, :-1].contiguous()}),
    "beta": lambda t: t.pop(f"{LAYER}.beta"),
}


@pytest.mark.parametrize("tensor", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_names_layer_and_tensor(llama_ckpt, tmp_path, tensor):
    bad = _corrupt(llama_ckpt.path, tmp_path, CORRUPTIONS[tensor])
    for load in (load_sfmp_model, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(FormatError, match=rf"{LAYER}.*{LAYER}\.{tensor}"):
            load(bad)


def test_checkpoint_shape_differs_from_model(llama_ckpt, tmp_path):
    """A layer consistent in itself but not with the model's [out, in] shape."""
    import json
    bad = tmp_path / "bad"
    shutil.copytree(llama_ckpt.path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # k_proj becomes [96, 96]; the stored one is [48, 96]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"model.layers.0.self_attn.k_proj.*\[48, 96\].*"
                                          r"\[96, 96\] in the model"):
        load_sfmp_model(bad)


def test_unknown_and_missing_plain_tensors(llama_ckpt, tmp_path):
    bad = _corrupt(llama_ckpt.path, tmp_path,
                   lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(FormatError, match=r"tensor model\.layers\.0\.extra\.weight"):
        load_sfmp_model(bad)
    shutil.rmtree(bad)
    bad = _corrupt(llama_ckpt.path, tmp_path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(FormatError, match=r"tensor model\.norm\.weight: missing"):
        load_sfmp_model(bad)


def test_quantize_in_memory_rejects_wrong_shape(tiny_llama, llama_ckpt):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    wrong = {"model.layers.0.self_attn.q_proj":
             llama_ckpt.packed["model.layers.0.self_attn.k_proj"]}
    with pytest.raises(FormatError, match=r"layer model\.layers\.0\.self_attn\.q_proj"):
        quantize_in_memory(model, wrong, llama_ckpt.config)


def _llama_with_bias(out_dir):
    from tests.tiny import make_tokenizer, tiny_config
    torch.manual_seed(0)
    config = tiny_config("llama", layers=1)
    config.attention_bias = True
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(out_dir)
    make_tokenizer().save_pretrained(out_dir)
    return out_dir


def test_linear_bias_roundtrip_and_missing(tmp_path):
    model_dir = _llama_with_bias(tmp_path / "m")
    ckpt = make_sfmp_checkpoint(model_dir, tmp_path / "ckpt")
    loaded = load_sfmp_model(ckpt.path)
    assert loaded.get_submodule("model.layers.0.self_attn.q_proj").bias is not None
    in_memory = quantize_in_memory(AutoModelForCausalLM.from_pretrained(model_dir),
                                   ckpt.packed, ckpt.config)
    assert torch.equal(logits(loaded), logits(in_memory))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(ckpt.path)), logits(loaded))
    name = "model.layers.0.self_attn.v_proj"
    bad = _corrupt(ckpt.path, tmp_path, lambda t: t.pop(f"{name}.bias"))
    for load in (load_sfmp_model, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(FormatError, match=rf"layer {name}: tensor {name}\.bias: missing"):
            load(bad)


def test_sfmp_linear_runs_the_serving_op_and_matches_the_reference(llama_ckpt):
    from sfmp_serve.hf import sfmp_matmul

    model = load_sfmp_model(llama_ckpt.path, dtype=torch.float32)
    linear = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 3, linear.in_features)
    reference = sfmp_matmul(x.double(), linear.packed(), linear.config)
    torch.testing.assert_close(linear(x).double(), reference, rtol=1e-5, atol=1e-5)
    assert linear._op[0].backend.name == "cpu-native"  # the compiled kernels, as vLLM runs them
    assert torch.equal(linear(x.double()), reference) and linear._op is None  # float64: reference