import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from offline.quantizers.awq import (AWQQuantizer, candidate_scales, clip_shrink_grid,
                                    fold_problem, fold_scales, gram, group_grams,
                                    scaled_output_error, search_clip, search_scales)
from offline.quantizers.base import LinearContext, row_group_bits
from offline.quantizers.blockwise import (LinearPlan, dequantize_codes, group_slices,
                                          quantize_minmax)
from sfmp_serve.arch import arch_for
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import LayerGeometry
from tests.offline_methods.plans import correlated_inputs, random_plans
from tests.tiny import make_tiny_model


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fold_is_exact_for_every_mapping(tmp_path, arch):
    # kv_heads == heads, so v_proj -> o_proj is foldable too and every mapping is exercised.
    path = make_tiny_model(tmp_path / arch, arch, hidden=64, intermediate=136, heads=4,
                           kv_heads=4)
    model = load(path)
    spec = arch_for(model.config.model_type)
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    g = torch.Generator().manual_seed(1)
    folded = 0
    for layer in model.get_submodule(spec.layers_path):
        for mapping in spec.smooth:
            k = layer.get_submodule(mapping.linears[0]).in_features
            assert fold_problem(layer, mapping, k) is None
            scales = torch.rand(k, generator=g) * 1.5 + 0.5
            w0 = layer.get_submodule(mapping.linears[0]).weight.clone()
            changed = fold_scales(layer, mapping, scales)
            assert f"{mapping.prev}.weight" in changed
            assert not torch.allclose(layer.get_submodule(mapping.linears[0]).weight, w0)
            folded += 1
    assert folded == len(spec.smooth) * model.config.num_hidden_layers
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_gqa_value_to_output_mapping_is_skipped_with_a_warning(tiny_llama, caplog):
    model = load(tiny_llama)  # 4 heads, 2 kv heads: v_proj has half the outputs o_proj reads
    spec = arch_for(model.config.model_type)
    plans = random_plans(model, spec)
    layer = model.model.layers[0]
    inputs = {n: correlated_inputs(64, layer.get_submodule(n).in_features) for n in spec.linears}
    o_before = layer.self_attn.o_proj.weight.clone()
    norm_before = layer.input_layernorm.weight.clone()
    local = {n: plans[f"model.layers.0.{n}"] for n in spec.linears}
    with caplog.at_level(logging.WARNING, logger="offline.quantizers.awq"):
        changed = AWQQuantizer().prepare_layer(layer, spec, local, inputs, "model.layers.0")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "self_attn.o_proj" in warnings[0] and "skipping" in warnings[0]
    assert torch.equal(layer.self_attn.o_proj.weight, o_before)
    assert "self_attn.o_proj.weight" not in changed
    assert "input_layernorm.weight" in changed  # the other mappings still run
    assert not torch.equal(layer.input_layernorm.weight, norm_before)


def test_norm_without_weight_is_skipped_with_a_warning(tiny_llama, caplog):
    model = load(tiny_llama)
    spec = arch_for(model.config.model_type)
    layer = model.model.layers[0]
    layer.input_layernorm = torch.nn.RMSNorm(model.config.hidden_size,
                                             elementwise_affine=False)
    mapping = next(m for m in spec.smooth if m.prev == "input_layernorm")
    assert "no weight" in fold_problem(layer, mapping, model.config.hidden_size)
    q_before = layer.self_attn.q_proj.weight.clone()
    plans = random_plans(model, spec)
    local = {n: plans[f"model.layers.0.{n}"] for n in spec.linears}
    inputs = {n: correlated_inputs(64, layer.get_submodule(n).in_features) for n in spec.linears}
    with caplog.at_level(logging.WARNING, logger="offline.quantizers.awq"):
        AWQQuantizer().prepare_layer(layer, spec, local, inputs, "model.layers.0")
    assert any("input_layernorm" in r.getMessage() and "no weight" in r.getMessage()
               for r in caplog.records)
    assert torch.equal(layer.self_attn.q_proj.weight, q_before)


def _plan(n: int, k: int, bits: int | None = None, seed: int = 0) -> LinearPlan:
    g = torch.Generator().manual_seed(seed)
    geo = LayerGeometry(n, k, 32, 16)
    table = (torch.full((geo.n_block_rows, geo.n_groups), bits, dtype=torch.uint8) if bits else
             torch.tensor([2, 3, 4], dtype=torch.uint8)[
                 torch.randint(3, (geo.n_block_rows, geo.n_groups), generator=g)])
    return LinearPlan(torch.randperm(k, generator=g), torch.randperm(n, generator=g), table, geo)


def test_scale_search_is_never_worse_than_no_scaling():
    torch.manual_seed(0)
    x = correlated_inputs(512, 96)
    weights = [torch.randn(40, 96), torch.randn(24, 96)]
    plans = [_plan(40, 96, seed=1), _plan(24, 96, seed=2)]
    scales, ratio = search_scales(x, weights, plans, grid=20)
    identity = scaled_output_error(gram(x), weights, plans, torch.ones(96))
    best = scaled_output_error(gram(x), weights, plans, scales)
    assert best <= identity
    assert ratio > 0 and best < identity  # large activation channels make scaling pay off
    torch.testing.assert_close(scales, candidate_scales(x.abs().mean(0), ratio))


def test_gram_error_is_the_mean_squared_output_error():
    torch.manual_seed(5)
    x = correlated_inputs(300, 96)
    weights = [torch.randn(40, 96), torch.randn(24, 96)]
    plans = [_plan(40, 96, seed=1), _plan(24, 96, seed=2)]
    scales = candidate_scales(x.abs().mean(0), 0.5)
    direct, count = 0.0, 0
    for w, plan in zip(weights, plans):
        wq = plan.restore(dequantize_codes(quantize_minmax(plan.reorder(w * scales),
                                                           plan.block_bits, plan.geometry),
                                           plan.geometry)) / scales
        direct += float(((x @ (w - wq).t()) ** 2).sum())
        count += x.shape[0] * w.shape[0]
    assert scaled_output_error(gram(x), weights, plans, scales) == pytest.approx(
        direct / count, rel=1e-4)


def test_clip_search_minimises_each_groups_output_error():
    torch.manual_seed(0)
    plan = _plan(40, 200, seed=3)
    w = torch.randn(40, 200)
    w[0, 0] = 9.0  # an outlier that clipping should cut
    x = correlated_inputs(256, 200)
    shrink = search_clip(w, plan.block_bits, plan.geometry, group_grams(x, plan.geometry),
                         grid=20, max_shrink=0.5)
    grid = torch.tensor(clip_shrink_grid(20, 0.5))
    assert torch.isclose(shrink.flatten()[:, None], grid[None, :]).any(1).all()
    assert shrink[0, 0] < 1.0
    clipped = dequantize_codes(quantize_minmax(w, plan.block_bits, plan.geometry, shrink),
                               plan.geometry)
    plain = dequantize_codes(quantize_minmax(w, plan.block_bits, plan.geometry), plan.geometry)
    for c0, c1 in group_slices(plan.geometry):
        def err(wq):
            return ((w[:, c0:c1] - wq[:, c0:c1]) @ x[:, c0:c1].t()).pow(2).mean(1)
        assert (err(clipped) <= err(plain) + 1e-6).all()


def test_awq_quantizer_codes_honour_block_bits():
    plan = _plan(40, 200, seed=4)
    w = torch.randn(40, 200)
    q = AWQQuantizer().quantize(w, plan.block_bits, plan.geometry,
                                LinearContext(inputs=correlated_inputs(300, 200)))
    maxq = 2 ** row_group_bits(plan.block_bits, plan.geometry) - 1
    assert (q.codes.to(torch.int64) <= maxq.repeat_interleave(plan.geometry.cols(), 1)).all()
    assert ((q.zero >= 0) & (q.zero <= maxq)).all()


def test_awq_without_inputs_is_a_user_error():
    plan = _plan(40, 200)
    with pytest.raises(SFMPError, match="needs calibration inputs"):
        AWQQuantizer().quantize(torch.randn(40, 200), plan.block_bits, plan.geometry,
                                LinearContext())
