"""`sfmp quantize --low-memory`: decoder layers streamed from safetensors, same checkpoint."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline import pipeline
from sfmp_serve.cli.main import main
from tests.tiny import CORPUS, make_family_model, make_tiny_model

SMALL = ["--group-size", "32", "--block-rows", "16", "--nsamples", "4", "--seqlen", "64"]


@pytest.fixture(scope="module")
def biased_bf16(tmp_path_factory):
    """bf16 weights (dtypes must survive streaming), q/k/v/o biases and no GQA, so AWQ folds
    the o_proj scale into v_proj's weight and bias."""
    return make_tiny_model(tmp_path_factory.mktemp("biased"), "llama", dtype=torch.bfloat16,
                           attention_bias=True, kv_heads=4)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(CORPUS))
    return path


def tensors(ckpt_dir):
    out = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def memory_and_streamed(model_dir, method, calib_text, tmp_path, monkeypatch):
    """The tensors of the checkpoint made in memory and of the one made --low-memory."""
    common = ["quantize", str(model_dir), "--bits", "3.5", "--method", method,
              "--calib", str(calib_text), *SMALL]
    assert main([*common, "--out", str(tmp_path / "memory")]) == 0

    def whole_model_forbidden(*args, **kwargs):
        raise AssertionError("--low-memory loaded the whole model")

    monkeypatch.setattr(pipeline, "load_model", whole_model_forbidden)
    assert main([*common, "--low-memory", "--out", str(tmp_path / "streamed")]) == 0
    return tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_streamed_checkpoint_equals_the_in_memory_one(biased_bf16, calib_text, tmp_path,
                                                      monkeypatch, method):
    memory, streamed = memory_and_streamed(biased_bf16, method, calib_text, tmp_path,
                                           monkeypatch)
    assert memory.keys() == streamed.keys()
    original = tensors(biased_bf16)
    folded = [k for k in memory if k.endswith("v_proj.bias")
              and not torch.equal(memory[k], original[k])]
    assert bool(folded) == (method == "awq")  # the streamed path must carry AWQ's bias folds
    for key in memory:
        assert streamed[key].dtype == memory[key].dtype, key
        # The only difference is the order in which layer-wise Fisher sums (1e-6 relative);
        # it moves no block across the allocation threshold on this model.
        torch.testing.assert_close(streamed[key], memory[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3", "mixtral", "qwen3_moe"])
def test_streamed_equals_in_memory_for_every_layout(model_type, calib_text, tmp_path,
                                                    monkeypatch):
    """Gemma 3's sliding-window and full layers get different masks and rotary tables (each
    layer's own arguments are caught), Phi-3 stores fused linears, Mixtral and Qwen3-MoE
    read each expert projection from its own tensor (Mixtral under another block name)."""
    model_dir = make_family_model(tmp_path / "model", model_type)
    memory, streamed = memory_and_streamed(model_dir, "awq", calib_text, tmp_path,
                                           monkeypatch)
    assert memory.keys() == streamed.keys()
    for key in memory:
        torch.testing.assert_close(streamed[key], memory[key], rtol=0, atol=0, msg=key)


def test_low_memory_without_calibration_text_is_a_one_line_error(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", str(tiny_llama), "--bits", "3.5", "--low-memory", *SMALL,
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and not out.exists()
    assert "--low-memory needs --calib" in err and len(err.splitlines()) == 1


def test_a_streamed_nan_names_the_tensor(tiny_llama, calib_text, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    [weights] = bad.glob("*.safetensors")
    state = load_file(weights)
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    code = main(["quantize", str(bad), "--bits", "3.5", "--low-memory", "--calib",
                 str(calib_text), *SMALL, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "model.layers.1.mlp.up_proj.weight contains NaN" in err
    assert not (tmp_path / "out").exists()
