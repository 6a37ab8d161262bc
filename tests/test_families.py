"""Self-test of every registered model family, each on a tiny random model built here.

For every model_type in sfmp_serve.arch: the table entry matches the model (every decoder linear
is a target, the input groups are exactly the linears that read one input, the fused layers are
vLLM's); random AWQ scales folded through the fold code the quantizer uses leave the logits
unchanged, and the folds that cannot be exact are skipped with a warning; quantize -> save ->
load in transformers gives the in-memory logits. Serving in vLLM:
tests/serving/test_families_vllm.py.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from offline.pipeline import QuantizeOptions, quantize_model, save_result
from offline.quantizers.awq import fold_layer, fold_problem
from offline.targets import find_targets
from sfmp_serve.arch import ARCHITECTURES, LINEAR, NORM, OFFSET_NORM, arch_for
from sfmp_serve.errors import SFMPError
from sfmp_serve.experts import unroll_experts
from sfmp_serve.hf import load_sfmp_model, quantize_in_memory
from tests.tiny import FAMILY_MODELS, make_family_model

MODEL_TYPES = [t for spec in ARCHITECTURES for t in spec.model_types]
IDS = torch.tensor([[0, 9, 31, 77, 150, 220, 301, 5, 40, 41, 42, 43, 44, 45]])  # > window 8


@pytest.fixture(scope="module", params=MODEL_TYPES)
def family(request, tmp_path_factory):
    """(model_type, directory of its tiny random model)."""
    return request.param, make_family_model(tmp_path_factory.mktemp(request.param),
                                            request.param)


def load(path) -> nn.Module:
    """The model as every stage sees it: a MoE family's experts one linear per expert."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    unroll_experts(model, arch_for(model.config.model_type))
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_every_registered_family_has_a_tiny_model():
    assert sorted(FAMILY_MODELS) == sorted(MODEL_TYPES)


def test_unknown_architecture_is_one_line_listing_the_families():
    with pytest.raises(SFMPError) as e:
        arch_for("gpt2")
    message = str(e.value)
    assert "\n" not in message and "'gpt2' is not supported" in message
    for spec in ARCHITECTURES:
        assert spec.family in message and all(t in message for t in spec.model_types)


def test_table_entry_matches_the_model(family):
    model_type, path = family
    model = load(path)
    spec = arch_for(model_type)
    targets = find_targets(model, spec)
    layers = model.get_submodule(spec.layers_path)
    listed = [[n for g in spec.layer_groups(layer) for n in g] for layer in layers]
    assert len(targets) == sum(map(len, listed))
    for layer, names in zip(layers, listed):  # no decoder linear forgotten, none listed twice
        linears = sorted(n for n, m in layer.named_modules() if isinstance(m, nn.Linear))
        assert linears == sorted(names) and len(set(names)) == len(names)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(f"{spec.layers_path}.{t.layer}.{t.capture}")
             .register_forward_pre_hook(lambda _m, args, name=t.name: seen.__setitem__(
                 name, args[0].detach().clone())) for t in targets]
    logits(model)
    for h in hooks:
        h.remove()
    # Every dense linear runs; a routed expert may receive none of these 14 tokens.
    assert all(t.name in seen for t in targets if t.expert is None)
    group_of = {name: group for group in targets.groups for name in group}
    for a in targets:  # same input <=> same input group
        for b in targets:
            if a.layer == b.layer and a.name in seen and b.name in seen:
                same = seen[a.name].shape == seen[b.name].shape and torch.equal(seen[a.name],
                                                                                seen[b.name])
                assert same == (group_of[a.name] == group_of[b.name]), (a.name, b.name)
    for layer in layers:  # a fold scales input groups, from a module that exists
        groups = spec.layer_groups(layer)
        for mapping in spec.layer_smooth(layer):
            # one input group; a routed mapping: whole groups, each expert's own tokens
            covered = [g for g in groups if set(g) <= set(mapping.linears)]
            assert sum(map(len, covered)) == len(mapping.linears)
            assert len(covered) == 1 or mapping.routed
            assert mapping.kind in (NORM, OFFSET_NORM, LINEAR)
            layer.get_submodule(mapping.prev)


def test_fused_layers_are_vllms_packed_modules(family):
    pytest.importorskip("vllm")
    from vllm.model_executor.models import ModelRegistry

    model_type, path = family
    architecture = load(path).config.architectures[0]
    vllm_mapping = ModelRegistry._try_load_model_cls(architecture).packed_modules_mapping
    spec = arch_for(model_type)
    table = {fused.rpartition(".")[2]: [n.rpartition(".")[2] for n in names]
             for fused, names in spec.fused.items()}
    # vLLM's mapping of a layer to itself is a linear stored fused (Phi-3): not in `fused`
    split = {k: list(v) for k, v in vllm_mapping.items() if list(v) != [k]}
    if getattr(load(path).config, "mlp_only_layers", None):  # vLLM adds it per instance then
        split.setdefault("gate_up_proj", ["gate_proj", "up_proj"])
    assert table == split
    stored = {name.rpartition(".")[2] for name in spec.linears}
    for layer_name, members in vllm_mapping.items():  # every shard vLLM loads is stored
        assert set(members) <= stored, layer_name


def _randomized_norms(model: nn.Module) -> nn.Module:
    """Norm weights away from their init (1 or 0), so a fold of the wrong kind shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _fold_random_scales(model: nn.Module, spec) -> tuple[int, set[tuple[str, ...]]]:
    """Random scales folded into every layer; returns (folds done, mappings skipped)."""
    g = torch.Generator().manual_seed(1)
    warned: set[tuple[str, ...]] = set()
    done = 0

    def random_scale(_mapping, in_features: int) -> torch.Tensor:
        nonlocal done
        done += 1
        return torch.rand(in_features, generator=g) * 1.5 + 0.5

    for i, layer in enumerate(model.get_submodule(spec.layers_path)):
        fold_layer(layer, spec, random_scale, f"{spec.layers_path}.{i}", warned)
    return done, warned


def test_random_awq_scales_fold_exactly(family, caplog):
    model_type, path = family
    model = _randomized_norms(load(path))
    spec = arch_for(model_type)
    before = logits(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="offline.quantizers.awq"):
        done, skipped = _fold_random_scales(model, spec)
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-4)
    config = model.config
    gqa = config.num_key_value_heads < config.num_attention_heads
    layers = model.get_submodule(spec.layers_path)
    per_layer = [spec.layer_smooth(layer) for layer in layers]
    # Exactly the value -> output fold is impossible under GQA; it is skipped with one warning.
    expected = {m.linears for smooth in per_layer for m in smooth
                if gqa and m.linears == ("self_attn.o_proj",)}
    assert skipped == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(expected) and all("skipping" in w for w in warnings)
    assert done == sum(len(smooth) for smooth in per_layer) - len(expected) * len(layers)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    for i, smooth in enumerate(per_layer):
        for mapping in smooth:
            if mapping.linears not in skipped:  # a MoE router takes the norm's scale too
                for name in (mapping.prev, *mapping.also):
                    assert f"{spec.layers_path}.{i}.{name}.weight" in changed, name


def test_a_wrong_fold_kind_changes_the_logits(tmp_path):
    """The fold test can fail: Gemma's (1 + w) norms folded as plain norms break the model."""
    model = _randomized_norms(load(make_family_model(tmp_path / "g", "gemma3_text")))
    spec = arch_for("gemma3_text")
    wrong = dataclasses.replace(spec, smooth=tuple(
        dataclasses.replace(m, kind=NORM) if m.kind == OFFSET_NORM else m for m in spec.smooth))
    before = logits(model)
    _fold_random_scales(model, wrong)
    assert not torch.allclose(logits(model), before, rtol=1e-2, atol=1e-2)


def test_fused_value_fold_is_refused_under_gqa(tmp_path, caplog):
    """Phi-3 with fewer KV heads: qkv_proj's rows are not three equal chunks, so v -> o_proj
    cannot be folded; the fold is skipped with a warning and the model is unchanged."""
    model = _randomized_norms(load(make_family_model(tmp_path / "p", "phi3", kv_heads=1)))
    spec = arch_for("phi3")
    mapping = next(m for m in spec.smooth if m.linears == ("self_attn.o_proj",))
    layer = model.get_submodule(spec.layers_path)[0]
    assert "equal chunks" in fold_problem(layer, mapping, layer.self_attn.o_proj.in_features)
    before = logits(model)
    with caplog.at_level(logging.WARNING, logger="offline.quantizers.awq"):
        _, skipped = _fold_random_scales(model, spec)
    assert skipped == {("self_attn.o_proj",)}
    assert any("self_attn.qkv_proj" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-4)


def test_quantize_save_load_gives_the_in_memory_logits(family, tmp_path):
    model_type, path = family
    options = QuantizeOptions(bits=3.0, budget_gb=None, levels=3, bit_choices=(2, 3, 4),
                              group_size=32, block_rows=16, nsamples=2, seqlen=16,
                              method="awq")
    result = quantize_model(path, options)
    ckpt = save_result(result, path, tmp_path / "ckpt")
    in_memory = quantize_in_memory(load(path), result.packed, result.config,
                                   result.extra_tensors)  # AWQ's folded norms (and routers)
    want = logits(in_memory)
    assert torch.equal(logits(load_sfmp_model(ckpt)), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(ckpt).eval()), want)
    assert not torch.allclose(want, logits(load(path)), atol=1e-3)  # it did quantize
    assert set(result.config.quantized_modules) == set(find_targets(load(path),
                                                                    arch_for(model_type)).targets)
