"""Mixture-of-experts families offline: every expert projection is a quantization target of
one global allocation, calibrated on the tokens routed to it; the checkpoint loads in
transformers with the in-memory model's logits (the family self-test, tests/test_families.py,
does the same for AWQ on data-free calibration; here every method on real routed text)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from offline.pipeline import QuantizeOptions, quantize_model, save_result
from offline.targets import find_targets
from sfmp_serve.arch import arch_for
from sfmp_serve.cli.main import main
from sfmp_serve.experts import unroll_experts
from sfmp_serve.hf import load_sfmp_model, quantize_in_memory
from tests.tiny import CORPUS, make_family_model, make_tiny_model, starve_expert

MOE = ["mixtral", "qwen3_moe"]
IDS = torch.tensor([[0, 9, 31, 77, 150, 220, 301, 5, 40, 41, 42, 43, 44, 45]])
STARVED = 3  # the expert no calibration token reaches in starved models


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(CORPUS))
    return str(path)


def options(method: str, calib: str) -> QuantizeOptions:
    # 4 x 64 tokens: enough for GPTQ on the 96-wide attention inputs; each expert gets its
    # share of 2 x 256 routed slots, some of them fewer than their inputs (RTN fallback).
    return QuantizeOptions(bits=3.0, budget_gb=None, levels=3, bit_choices=(2, 3, 4),
                           group_size=32, block_rows=16, nsamples=4, seqlen=64, method=method,
                           calib=calib)


def load(path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    unroll_experts(model, arch_for(model.config.model_type))
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def sparse_layers(model_type: str) -> list[int]:
    return [0, 1] if model_type == "mixtral" else [1]  # Qwen3-MoE: mlp_only_layers=[0]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("model_type", MOE)
def test_quantize_save_load_gives_the_in_memory_logits(model_type, method, calib, tmp_path):
    path = make_family_model(tmp_path / "model", model_type)
    result = quantize_model(path, options(method, calib))
    ckpt = save_result(result, path, tmp_path / "ckpt")
    want = logits(quantize_in_memory(load(path), result.packed, result.config,
                                     result.extra_tensors))
    assert torch.equal(logits(load_sfmp_model(ckpt)), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(ckpt).eval()), want)
    assert not torch.allclose(want, logits(load(path)), atol=1e-3)  # it did quantize
    spec = arch_for(model_type)
    targets = find_targets(load(path), spec)
    assert set(result.config.quantized_modules) == set(targets.targets)
    experts = [t for t in targets if t.expert is not None]
    assert len(experts) == 4 * 3 * len(sparse_layers(model_type))
    # Routers stay in full precision, stored under the checkpoint's name.
    block = spec.moe.stored_block
    with safe_open(str(next(ckpt.glob("*.safetensors"))), "pt") as f:
        for i in sparse_layers(model_type):
            router = f"model.layers.{i}.{block}.{spec.moe.router}"
            assert router not in result.config.quantized_modules
            assert f.get_slice(f"{router}.weight").get_dtype() == "F32"


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("model_type", MOE)
def test_an_expert_without_calibration_tokens_falls_back_to_rtn(model_type, method, calib,
                                                                tmp_path, caplog):
    """No token reaches expert 3: GPTQ and AWQ (which rest on X^T X) quantize it with RTN
    and say so with the count; its Fisher salience is zero, so the global allocation gives it
    the lowest width while the average stays on target."""
    path = starve_expert(make_family_model(tmp_path / "model", model_type), STARVED)
    with caplog.at_level(logging.WARNING, logger="offline.sequential"):
        result = quantize_model(path, options(method, calib))
    spec = arch_for(model_type)
    block = f"{spec.moe.stored_block}.{spec.moe.experts}"
    messages = [r.getMessage() for r in caplog.records]
    for i in sparse_layers(model_type):
        starved = [f"model.layers.{i}.{block}.{STARVED}.{p}"
                   for p in (spec.moe.gate, spec.moe.up, spec.moe.down)]
        assert any(starved[0] in m and "routed 0 calibration tokens" in m and "RTN" in m
                   for m in messages), messages
        for name in starved:
            assert result.packed[name].block_bits.unique().tolist() == [2], name
    bits = torch.cat([p.block_bits.flatten().float() for p in result.packed.values()])
    assert 2 < bits.max() and abs(result.config.avg_bits - 3.0) < 0.05
    ckpt = save_result(result, path, tmp_path / "ckpt")
    want = logits(quantize_in_memory(load(path), result.packed, result.config,
                                     result.extra_tensors))
    assert torch.equal(logits(load_sfmp_model(ckpt)), want)


def test_one_allocation_spans_attention_dense_and_expert_blocks(calib, tmp_path):
    """Qwen3-MoE with a dense layer 0: the widths of attention, dense MLP and experts come
    from one ranking, so they differ between kinds and between experts."""
    path = make_family_model(tmp_path / "model", "qwen3_moe")
    # At 3.5 bits some expert blocks rise above the minimum (at 3, all sit at 2 bits: a
    # sparsely read expert's weights gather less Fisher than attention's).
    result = quantize_model(path, dataclasses.replace(options("rtn", calib), bits=3.5))
    mean = {n: p.block_bits.float().mean().item() for n, p in result.packed.items()}
    kinds = {"attention": [v for n, v in mean.items() if ".self_attn." in n],
             "dense": [v for n, v in mean.items() if "layers.0.mlp." in n],
             "experts": [v for n, v in mean.items() if ".experts." in n]}
    assert all(kinds.values())
    assert min(kinds["experts"]) < min(kinds["attention"] + kinds["dense"])
    assert abs(result.config.avg_bits - 3.5) < 0.05
    per_expert = {e: sum(v for n, v in mean.items() if f".experts.{e}." in n) for e in range(4)}
    assert len(set(per_expert.values())) > 1


@pytest.mark.parametrize("model_type", MOE)
def test_every_expert_of_a_layer_ignored_stays_dense(model_type, calib, tmp_path):
    """--ignore on all experts of the last layer: they are stored unquantized per expert, and
    transformers (which then keeps that layer's experts stacked) gives the in-memory logits."""
    path = make_family_model(tmp_path / "model", model_type)
    opts = dataclasses.replace(options("awq", calib), ignore=(r"layers\.1\..*experts",))
    result = quantize_model(path, opts)
    assert not any(".layers.1." in n and ".experts." in n
                   for n in result.config.quantized_modules)
    ckpt = save_result(result, path, tmp_path / "ckpt")
    want = logits(quantize_in_memory(load(path), result.packed, result.config,
                                     result.extra_tensors))
    assert torch.equal(logits(load_sfmp_model(ckpt)), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(ckpt).eval()), want)


def test_an_ignore_that_splits_the_experts_is_refused(calib, tmp_path, capsys):
    path = make_family_model(tmp_path / "model", "mixtral")
    capsys.readouterr()  # transformers' progress bars while saving
    code = main(["quantize", str(path), "--bits", "3", "--ignore", r"experts\.0\.",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err  # one error line after transformers' bars
    assert "ignore all or none of them" in err.splitlines()[-1] and "experts" in err


def test_a_moe_family_not_in_the_table_is_the_one_line_unsupported_error(tmp_path, capsys):
    path = make_tiny_model(tmp_path / "olmoe", "olmoe", heads=3, kv_heads=1, num_experts=4,
                           num_experts_per_tok=2, intermediate=72)
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["quantize", str(path), "--bits", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and not out.exists() and "Traceback" not in err
    line = err.splitlines()[-1]
    assert "'olmoe' is not supported" in line and "Mixtral" in line and "Qwen3-MoE" in line
