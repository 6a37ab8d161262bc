"""--ignore and --pin: honoured in the checkpoint, counted in the average, mistakes refused."""

import re

import pytest
import torch
from safetensors.torch import load_file

from offline import allocation as alloc
from offline import pipeline
from sfmp_serve.cli.main import main
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import LayerGeometry, load_checkpoint

FAST = ["--method", "rtn", "--group-size", "32", "--block-rows", "16", "--nsamples", "2",
        "--seqlen", "16"]
IGNORED = [f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj")]


def code_bits(ckpt, names):
    """(weights, code bits) of the named quantized linears."""
    weights = bits = 0
    for name in names:
        p = ckpt.packed(name)
        geo = p.geometry(ckpt.config)
        weights += geo.out_features * geo.in_features
        bits += int((p.block_bits.long() * alloc.block_sizes(geo)).sum())
    return weights, bits


def test_ignore_and_pin_are_honoured_and_counted(tmp_path, tiny_llama):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama), "--bits", "3.25", "--ignore",
                 r"layers\.0\.mlp\.(gate|up)", "--pin", "down_proj=8", *FAST,
                 "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    original = load_file(tiny_llama / "model.safetensors")
    quantized = ckpt.config.quantized_modules
    # ignored: not listed, stored as the original weight, no SFMP tensor
    for name in IGNORED:
        assert name not in quantized and f"{name}.qweight" not in ckpt.tensors
        assert torch.equal(ckpt.tensors[f"{name}.weight"], original[f"{name}.weight"])
    assert len(quantized) == 14 - len(IGNORED)
    # pinned: every block at 8 bits
    pinned = [n for n in quantized if n.endswith("down_proj")]
    assert pinned and all((ckpt.packed(n).block_bits == 8).all() for n in pinned)
    assert 8 in ckpt.config.bit_choices
    # the average over every quantized weight (pins included) hits the target, so the free
    # blocks sit far below it
    weights, bits = code_bits(ckpt, quantized)
    assert abs(bits / weights - ckpt.config.avg_bits) < 1e-5
    assert abs(ckpt.config.avg_bits - 3.25) <= 0.01
    free_w, free_bits = code_bits(ckpt, [n for n in quantized if n not in pinned])
    assert free_bits / free_w < 2.5
    assert ckpt.config.method_args["pin"] == {"down_proj": 8}


def test_ignored_linears_load_and_run_in_transformers(tmp_path, tiny_llama):
    import sfmp_serve.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from sfmp_serve.hf import SFMPLinear, load_sfmp_model

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama), "--bits", "3", "--ignore", "layers.1.self_attn",
                 *FAST, "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layer = model.model.layers[1]
    assert type(layer.self_attn.q_proj) is torch.nn.Linear
    assert isinstance(layer.mlp.down_proj, SFMPLinear)
    ids = torch.tensor([[0, 5, 9, 17, 33]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits,
                                   load_sfmp_model(out, dtype=torch.float32)(ids).logits)


@pytest.mark.parametrize("flags,match", [
    (["--pin", "mlp=8"], r"--pin makes the target 3 bits unreachable: the pinned linears hold "
                         r"\d+\.\d% of the quantized weights at 8 bits, so the others would "
                         r"need -?\d+\.\d+ bits on average, outside \[1, 8\]"),
    (["--levels", "3", "--bit-choices", "2,3,4", "--pin", "mlp=4"],
     r"outside \[2, 4\]"),
    (["--ignore", "k_proj"], r"model.layers.0.self_attn.k_proj is ignored but q_proj, v_proj "
                             r"not: vLLM fuses them into one layer"),
    (["--ignore", "lm_head"], r"--ignore 'lm_head': matches none of the 14 quantized linears"),
    (["--ignore", ".*"], "every linear is ignored"),
    (["--ignore", "down", "--pin", "layers.1.mlp.down=4"], "is also ignored"),
    (["--pin", "down=4", "--pin", "layers.0=3"], "already pinned to 4 bits by --pin down=4"),
    (["--pin", "down=9"], r"--pin down=9: bits must be in 1..8"),
    (["--pin", "down"], "--pin 'down': expected REGEX=BITS"),
])
def test_override_mistakes_are_one_line(tmp_path, capsys, monkeypatch, tiny_llama, flags,
                                        match):
    def expensive(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(pipeline, "calibration_tokens", expensive)  # all refused before it
    rc = main(["quantize", str(tiny_llama), "--bits", "3", *flags, *FAST,
               "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and re.search(match, err[-1]), err
    assert list(tmp_path.iterdir()) == []


def test_pins_with_a_budget(tmp_path, tiny_llama):
    sizes = {}
    for bits in (3, 4):
        out = tmp_path / f"u{bits}"
        assert main(["quantize", str(tiny_llama), "--bits", str(bits), "--uniform", *FAST,
                     "--out", str(out)]) == 0
        sizes[bits] = sum(t.numel() * t.element_size()
                          for t in load_file(out / "model.safetensors").values())
    budget = (sizes[3] + sizes[4]) // 2
    out = tmp_path / "b"
    assert main(["quantize", str(tiny_llama), "--budget-gb", str(budget / 1e9), "--pin",
                 "o_proj=2", *FAST, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert sum(t.numel() * t.element_size() for t in ckpt.tensors.values()) <= budget
    assert all((ckpt.packed(n).block_bits == 2).all()
               for n in ckpt.config.quantized_modules if n.endswith("o_proj"))
    assert 3.3 < ckpt.config.avg_bits < 3.7


def test_allocate_with_pins_is_exact_on_a_toy_grid():
    geo = LayerGeometry(32, 64, 32, 16)  # 4 blocks of 512 weights
    sizes = {n: alloc.block_sizes(geo) for n in ("a", "b", "c")}
    importance = {"a": torch.tensor([[4.0, 3.0], [2.0, 1.0]]),
                  "b": torch.tensor([[8.0, 7.0], [6.0, 5.0]])}
    result = alloc.allocate_with_pins(importance, sizes, {"c": 6}, 3.5,
                                      lambda t: alloc.resolve_choices(t, 2, None), (1, 8))
    # c holds a third of the weights at 6 bits, so a and b average 2.25 over their 8 blocks:
    # the two most important get 3 bits, the rest 2
    assert (result.block_bits["c"] == 6).all() and result.avg_bits == 3.5
    assert result.bit_choices == (2, 3, 6)
    assert result.block_bits["b"].tolist() == [[3, 3], [2, 2]]
    assert result.block_bits["a"].tolist() == [[2, 2], [2, 2]]
    with pytest.raises(SFMPError, match=r"others would need 0\.7500 bits on average, outside "
                                        r"\[1, 8\]"):
        alloc.allocate_with_pins(importance, sizes, {"c": 6}, 2.5, lambda t: (1, 2), (1, 8))
