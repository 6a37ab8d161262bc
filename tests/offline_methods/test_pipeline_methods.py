"""`sfmp quantize --method awq|gptq [--uniform]` through the real pipeline and CLI."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from offline import pipeline
from sfmp_serve.bitplanes import unpack_codes
from sfmp_serve.cli.main import main
from sfmp_serve.format import load_checkpoint
from sfmp_serve.ops.reference import dequantize

SMALL = ["--group-size", "32", "--block-rows", "16", "--nsamples", "4", "--seqlen", "64"]


@pytest.fixture
def spies(monkeypatch):
    """Keep the pipeline's allocation and loaded (then quantized in place) model."""
    seen = {}
    allocate, load = pipeline.allocate_bits, pipeline.load_model

    def allocate_spy(*args, **kwargs):
        seen["allocation"] = allocate(*args, **kwargs)
        return seen["allocation"]

    def load_spy(*args, **kwargs):
        seen["loaded"] = load(*args, **kwargs)
        return seen["loaded"]

    monkeypatch.setattr(pipeline, "allocate_bits", allocate_spy)
    monkeypatch.setattr(pipeline, "load_model", load_spy)
    return seen


@pytest.mark.parametrize("method,arg", [("gptq", "percdamp"), ("awq", "clip_grid")])
def test_calibrated_methods_write_the_allocated_bits(tiny_llama, tmp_path, spies, method, arg):
    out = tmp_path / method
    assert main(["quantize", str(tiny_llama), "--bits", "3.5", "--method", method, *SMALL,
                 "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.config.method == method and arg in ckpt.config.method_args
    assert abs(ckpt.config.avg_bits - 3.5) <= 0.01
    allocation = spies["allocation"]
    for name in ckpt.config.quantized_modules:
        packed = ckpt.packed(name)
        assert torch.equal(packed.block_bits, allocation.block_bits[name]), name
        codes = unpack_codes(packed.qweight, packed.block_bits, packed.block_offsets,
                             packed.geometry(ckpt.config))
        maxq = (2 ** packed.block_bits.long() - 1).repeat_interleave(
            packed.geometry(ckpt.config).rows(), 0).repeat_interleave(
            packed.geometry(ckpt.config).cols(), 1)
        assert (codes.long() <= maxq).all()
        assert (codes.long() == maxq).any()  # the top code of the wider blocks is used


def test_awq_checkpoint_equals_the_model_quantized_in_memory(tiny_llama, tmp_path, spies):
    from sfmp_serve.hf import load_sfmp_model

    out = tmp_path / "awq"
    assert main(["quantize", str(tiny_llama), "--bits", "3.5", "--method", "awq", *SMALL,
                 "--out", str(out)]) == 0
    in_memory = spies["loaded"].model  # fake-quantized and folded in place by the engine
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    norm = "model.layers.0.input_layernorm.weight"
    ckpt = load_checkpoint(out)
    assert not torch.equal(ckpt.tensors[norm], original.state_dict()[norm])  # scale folded
    ids = torch.randint(3, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_sfmp_model(out)(ids).logits, in_memory(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def direct_minmax_g32(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain g32 asymmetric min-max fake quantization, written independently of the package."""
    n, k = w.shape
    out = torch.empty_like(w)
    maxq = 2 ** bits - 1
    for c0 in range(0, k, 32):
        g = w[:, c0:c0 + 32]
        lo = g.min(1, keepdim=True).values.clamp(max=0)
        hi = g.max(1, keepdim=True).values.clamp(min=0)
        s = (hi - lo) / maxq
        s[s == 0] = 1
        z = torch.round(-lo / s).clamp(0, maxq)
        out[:, c0:c0 + 32] = s * (torch.clamp(torch.round(g / s) + z, 0, maxq) - z)
    return out


def test_uniform_rtn_is_plain_group_quantization(tiny_llama, tmp_path):
    out = tmp_path / "uniform"
    # one tensor-parallel range: groups of 32 over the whole width, as plain g32 lays them
    assert main(["quantize", str(tiny_llama), "--bits", "3", "--uniform", "--method", "rtn",
                 "--tp-shards", "1", *SMALL, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    for name in ckpt.config.quantized_modules:
        packed = ckpt.packed(name)
        assert torch.equal(packed.input_perm, torch.arange(packed.in_features,
                                                           dtype=torch.int32))
        assert torch.equal(packed.output_perm, torch.arange(packed.out_features,
                                                            dtype=torch.int32))
        assert (packed.block_bits == 3).all()
        torch.testing.assert_close(dequantize(packed, ckpt.config),
                                   direct_minmax_g32(original[f"{name}.weight"], 3),
                                   rtol=1e-5, atol=1e-6)


def test_uniform_gptq_calibrates_with_identity_orders(tiny_llama, tmp_path):
    out = tmp_path / "uniform-gptq"
    assert main(["quantize", str(tiny_llama), "--bits", "4", "--uniform", "--method", "gptq",
                 *SMALL, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.config.method == "gptq" and ckpt.config.calibration["nsamples"] == 4
    packed = ckpt.packed("model.layers.1.mlp.down_proj")
    assert torch.equal(packed.input_perm, torch.arange(packed.in_features, dtype=torch.int32))
    assert (packed.block_bits == 4).all()


def test_gptq_with_too_little_calibration_is_a_one_line_error(tiny_llama, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["quantize", str(tiny_llama), "--bits", "3", "--method", "gptq",
                 "--group-size", "32", "--block-rows", "16", "--nsamples", "1", "--seqlen",
                 "32", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("sfmp quantize: error:")]  # progress bars share stderr
    assert len(errors) == 1 and "--nsamples" in errors[0] and "q_proj" in errors[0]
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_cuda_and_cpu_give_the_same_model_up_to_float_noise(tiny_llama, tmp_path, method):
    """--device only moves the arithmetic. Text calibration: data-free sampling would draw
    different tokens from logits that differ in the last bits."""
    from sfmp_serve.hf import load_sfmp_model
    from tests.tiny import CORPUS

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS))
    logits = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(["quantize", str(tiny_llama), "--bits", "3.5", "--method", method, *SMALL,
                     "--calib", str(calib), "--device", device, "--out", str(out)]) == 0
        ids = torch.arange(3, 60)[None]
        with torch.no_grad():
            logits[device] = load_sfmp_model(out, dequantized=True)(ids).logits
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_perturbation_policy_three_levels_and_fisher_clip(tiny_llama, tmp_path, spies, method):
    """--bits 4 --levels 3 --policy perturbation with Fisher clipping: the widths 3/4/5 at an
    average of 4, recorded in the config, and a checkpoint transformers runs."""
    from offline import allocation as alloc
    from sfmp_serve.hf import load_sfmp_model

    out = tmp_path / method
    assert main(["quantize", str(tiny_llama), "--bits", "4", "--levels", "3", "--policy",
                 "perturbation", "--method", method, "--method-arg", "clip=fisher", *SMALL,
                 "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.config.bit_choices == (3, 4, 5)
    assert abs(ckpt.config.avg_bits - 4.0) <= 0.05  # tiny model: few, coarse blocks
    assert ckpt.config.method_args["clip"] == "fisher"
    assert ckpt.config.method_args["allocation"] == "fisher-perturbation"
    allocation = spies["allocation"]
    used = {int(b) for t in allocation.block_bits.values() for b in t.flatten()}
    assert len(used) >= 2
    model = load_sfmp_model(out)
    ids = torch.arange(1, 17)[None]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_perturbation_policy_ranks_by_error_not_salience(tiny_llama, tmp_path, monkeypatch):
    """The allocation receives each block's errors at the choices, not summed Fisher."""
    from offline import allocation as alloc

    seen = {}
    allocate = pipeline.alloc.allocate

    def spy(importance, *args, **kwargs):
        seen["importance"] = importance
        return allocate(importance, *args, **kwargs)

    monkeypatch.setattr(pipeline.alloc, "allocate", spy)
    assert main(["quantize", str(tiny_llama), "--bits", "3.5", "--policy", "perturbation",
                 *SMALL, "--out", str(tmp_path / "p")]) == 0
    errors = next(iter(seen["importance"].values()))
    assert isinstance(errors, alloc.BlockErrors) and errors.widths == (3, 4)
    assert (errors.errors[0] >= errors.errors[1]).all()


def test_the_default_is_gptq_with_fisher_clipping_and_perturbation(tiny_llama, tmp_path):
    """The best measured configuration (docs/results.md, quality v2) is what a user gets."""
    out = tmp_path / "default"
    assert main(["quantize", str(tiny_llama), "--bits", "3.5", *SMALL, "--out", str(out)]) == 0
    config = load_checkpoint(out).config
    assert config.method == "gptq" and config.method_args["clip"] == "fisher"
    assert config.method_args["allocation"] == "fisher-perturbation"
