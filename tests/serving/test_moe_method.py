"""The vLLM MoE adapter without a server: method choice for a FusedMoE layer, per-expert
tensors arriving through the weight loader as (expert id, shard id) in any order, validation
at load, and apply() against the reference op over the routed experts."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import TENSOR_SUFFIXES
from sfmp_serve.ops.reference import sfmp_linear_reference
from tests.serving.packed import random_packed, sfmp_config

pytest.importorskip("vllm")
from vllm.model_executor.layers.fused_moe import RoutedExperts  # noqa: E402
from vllm.model_executor.layers.fused_moe.activation import MoEActivation  # noqa: E402

from sfmp_serve.quant_method.config import SFMPQuantConfig  # noqa: E402
from sfmp_serve.quant_method.moe_method import SFMPMoEMethod  # noqa: E402

PREFIX = "model.layers.0.block_sparse_moe.experts"
E, H, I = 4, 64, 48  # experts, hidden, intermediate (48: a ragged last group of 32)
SHARD_NAMES = {"w1": "w1", "w3": "w3", "w2": "w2"}  # Mixtral's checkpoint names


def expert_modules(n: int = E) -> tuple[str, ...]:
    return tuple(f"{PREFIX}.{e}.{p}" for e in range(n) for p in ("w1", "w3", "w2"))


class FakeExperts(RoutedExperts):
    """A RoutedExperts without vLLM's engine set-up: only what the method reads."""

    def __init__(self, experts: int = E) -> None:
        torch.nn.Module.__init__(self)
        self.ckpt_gate_proj_name, self.ckpt_up_proj_name, self.ckpt_down_proj_name = (
            "w1", "w3", "w2")
        self.global_num_experts = self.local_num_experts = experts
        self.params_dtype = torch.float32
        self.moe_config = SimpleNamespace(activation=MoEActivation.SILU, is_act_and_mul=True)


def quant_config(modules=expert_modules()) -> SFMPQuantConfig:
    return SFMPQuantConfig.from_config(sfmp_config(modules).to_dict())


@pytest.fixture(scope="module")
def experts():
    """Per expert {shard id: PackedLinear}; gate and up share one input order."""
    gen = torch.Generator().manual_seed(0)
    cfg = sfmp_config(expert_modules())
    out = []
    for _ in range(E):
        perm = torch.randperm(H, generator=gen)
        out.append({"w1": random_packed(I, H, cfg, gen, perm),
                    "w3": random_packed(I, H, cfg, gen, perm),
                    "w2": random_packed(H, I, cfg, gen)})
    return out


def loaded(experts, seed: int = 0, drop=None):
    """(method, layer) after every tensor arrived through vLLM's call, in a shuffled order."""
    layer = FakeExperts()
    method = quant_config().get_quant_method(layer, PREFIX)
    method.create_weights(layer, E, H, I, torch.float32)
    items = [(e, shard, suffix) for e in range(E) for shard in ("w1", "w3", "w2")
             for suffix in TENSOR_SUFFIXES if (e, shard, suffix) != drop]
    random.Random(seed).shuffle(items)
    for e, shard, suffix in items:
        param = getattr(layer, f"{'w2' if shard == 'w2' else 'w13'}_{suffix}")
        ok = param.weight_loader(param=param, loaded_weight=getattr(experts[e][shard], suffix),
                                 weight_name=f"{PREFIX}.w13_{suffix}", shard_id=shard,
                                 expert_id=e, return_success=True)
        assert ok is True
    return method, layer


def reference(x, topk_weights, topk_ids, experts) -> torch.Tensor:
    cfg = sfmp_config(expert_modules())
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            ex = experts[int(topk_ids[t, k])]
            xt = x[t:t + 1]
            h = F.silu(sfmp_linear_reference(xt, ex["w1"], cfg, "dequant")) * \
                sfmp_linear_reference(xt, ex["w3"], cfg, "dequant")
            out[t] += topk_weights[t, k] * sfmp_linear_reference(h, ex["w2"], cfg, "dequant")[0]
    return out


def test_a_fused_moe_layer_is_sfmp_when_all_experts_are_quantized():
    assert isinstance(quant_config().get_quant_method(FakeExperts(), PREFIX), SFMPMoEMethod)
    # none quantized: vLLM's own unquantized experts
    assert quant_config(("model.layers.0.self_attn.q_proj",)).get_quant_method(
        FakeExperts(), PREFIX) is None
    with pytest.raises(SFMPError, match=rf"{PREFIX}.3.w2 is not in .*quantize all experts"):
        quant_config(expert_modules()[:-1]).get_quant_method(FakeExperts(), PREFIX)


@pytest.mark.parametrize("seed", [0, 1])
def test_experts_in_any_order_then_the_routed_sum(experts, seed):
    method, layer = loaded(experts, seed)
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "_sfmp_loaded")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, H, generator=gen)
    # expert 2 gets no token: the loop must skip it
    topk_ids = torch.tensor([[0, 1], [3, 0], [1, 3], [0, 3], [1, 0], [3, 1], [0, 1]])
    topk_weights = torch.softmax(torch.randn(7, 2, generator=gen), -1)
    got = method.apply(layer, x, topk_weights, topk_ids)
    torch.testing.assert_close(got, reference(x, topk_weights, topk_ids, experts),
                               rtol=1e-4, atol=1e-5)


def test_a_missing_tensor_names_the_stored_linear(experts):
    method, layer = loaded(experts, drop=(2, "w3", "alpha"))
    with pytest.raises(FormatError, match=rf"layer {PREFIX}.2.w3: missing .*{PREFIX}.2.w3.alpha"):
        method.process_weights_after_loading(layer)


def test_a_wrong_shard_or_expert_id_is_rejected(experts):
    layer = FakeExperts()
    method = quant_config().get_quant_method(layer, PREFIX)
    method.create_weights(layer, E, H, I, torch.float32)
    with pytest.raises(FormatError, match=r"expert 0, shard 'w2'; expected .*\('w1', 'w3'\)"):
        layer.w13_qweight.weight_loader(param=layer.w13_qweight, loaded_weight=torch.zeros(1),
                                        weight_name="w13_qweight", shard_id="w2", expert_id=0)
    with pytest.raises(FormatError, match=r"expert 9"):
        layer.w2_qweight.weight_loader(param=layer.w2_qweight, loaded_weight=torch.zeros(1),
                                       weight_name="w2_qweight", shard_id="w2", expert_id=9)
