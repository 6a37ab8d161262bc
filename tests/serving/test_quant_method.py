"""The vLLM adapter without a server: registration, per-layer method choice, shard loading,
validation at load, and the op call in apply()."""

from __future__ import annotations

import random

import pytest
import torch

from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import TENSOR_SUFFIXES
from sfmp_serve.ops.reference import sfmp_linear_reference
from tests.serving.packed import random_packed, sfmp_config

pytest.importorskip("vllm")
# The adapter imports vLLM: only after the skip check.
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod  # noqa: E402

from sfmp_serve.quant_method import config as config_module  # noqa: E402
from sfmp_serve.quant_method.config import SFMPQuantConfig  # noqa: E402
from sfmp_serve.quant_method.linear_method import SFMPLinearMethod  # noqa: E402
from sfmp_serve.quant_method.plugin import register  # noqa: E402

ATTN = "model.layers.0.self_attn"
QKV = (f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj")


class FakeLinear(LinearBase):
    """A LinearBase without vLLM's distributed set-up: only what the method touches."""

    def __init__(self, params_dtype: torch.dtype = torch.float32) -> None:
        torch.nn.Module.__init__(self)
        self.params_dtype = params_dtype


def _quant_config(modules=QKV) -> SFMPQuantConfig:
    return SFMPQuantConfig.from_config(sfmp_config(modules).to_dict())


def test_register_is_idempotent_and_detectable():
    from vllm.model_executor.layers.quantization import (QUANTIZATION_METHODS,
                                                         get_quantization_config)
    register()
    register()
    assert QUANTIZATION_METHODS.count("sfmp") == 1
    assert get_quantization_config("sfmp") is SFMPQuantConfig


def test_from_config_validates_through_the_format():
    data = sfmp_config(QKV).to_dict()
    with pytest.raises(FormatError, match=r"unknown key\(s\) \['bitz'\]"):
        SFMPQuantConfig.from_config({**data, "bitz": 3})
    assert torch.float32 in _quant_config().get_supported_act_dtypes()


def test_fused_prefix_maps_to_stored_linears_in_vllm_order():
    cfg = _quant_config()  # no packed_modules_mapping from vLLM: the arch table's copy
    assert cfg.shards_of(f"{ATTN}.qkv_proj") == list(QKV)
    assert cfg.shards_of("model.layers.3.mlp.gate_up_proj") == [
        "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]
    assert cfg.shards_of("model.layers.3.mlp.down_proj") == ["model.layers.3.mlp.down_proj"]


def test_vllm_packed_modules_mapping_decides_the_shards():
    # Phi-3 stores qkv_proj fused: vLLM's mapping names the layer itself, one stored linear
    cfg = _quant_config((f"{ATTN}.qkv_proj",))
    cfg.packed_modules_mapping = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}
    assert cfg.shards_of(f"{ATTN}.qkv_proj") == [f"{ATTN}.qkv_proj"]
    cfg = _quant_config()
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert cfg.shards_of(f"{ATTN}.qkv_proj") == list(QKV)


def test_one_stored_linear_serves_every_vllm_partition():
    name = f"{ATTN}.qkv_proj"
    cfg = _quant_config((name,))
    cfg.packed_modules_mapping = {"qkv_proj": ["qkv_proj"]}
    gen = torch.Generator().manual_seed(1)
    packed = random_packed(128, 64, sfmp_config((name,)), gen, torch.randperm(64, generator=gen))
    method = cfg.get_quant_method(FakeLinear(), name)
    layer = FakeLinear()
    method.create_weights(layer, 64, [64, 32, 32], 64, 128, torch.float32)  # q, k, v sizes
    for suffix in TENSOR_SUFFIXES:
        param = getattr(layer, suffix)
        param.weight_loader(param, getattr(packed, suffix))  # vLLM passes no shard id
    with pytest.raises(FormatError, match=r"shard id 'q', expected one of \[None\]"):
        layer.alpha.weight_loader(layer.alpha, packed.alpha, "q")
    method.process_weights_after_loading(layer)
    x = torch.randn(3, 64)
    torch.testing.assert_close(method.apply(layer, x),
                               sfmp_linear_reference(x, packed, sfmp_config((name,)), "dequant"),
                               rtol=1e-5, atol=1e-5)


def test_method_choice_per_layer(monkeypatch):
    cfg = _quant_config(QKV + ("model.layers.0.mlp.gate_proj",))
    assert isinstance(cfg.get_quant_method(FakeLinear(), f"{ATTN}.qkv_proj"), SFMPLinearMethod)
    assert isinstance(cfg.get_quant_method(FakeLinear(), f"{ATTN}.o_proj"),
                      UnquantizedLinearMethod)
    assert cfg.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None
    with pytest.raises(SFMPError, match=r"layer model.layers.0.mlp.gate_up_proj: .*"
                                        r"\['model.layers.0.mlp.up_proj'\] are not in"):
        cfg.get_quant_method(FakeLinear(), "model.layers.0.mlp.gate_up_proj")
    monkeypatch.setattr(config_module, "_tensor_parallel_size", lambda: 2)
    with pytest.raises(SFMPError, match="tensor parallel size 2 does not divide the "
                                        "checkpoint's tp_shards=1"):
        cfg.get_quant_method(FakeLinear(), f"{ATTN}.qkv_proj")


def _loaded_layer(shards, order, edit=None):
    """A FakeLinear whose qkv shards arrived through the weight loaders in `order`."""
    cfg = _quant_config()
    method = cfg.get_quant_method(FakeLinear(), f"{ATTN}.qkv_proj")
    layer = FakeLinear()
    method.create_weights(layer, 64, [s.out_features for s in shards], 64,
                          sum(s.out_features for s in shards), torch.float32)
    items = [(shard_id, suffix, getattr(shards[i], suffix))
             for i, shard_id in enumerate("qkv") for suffix in TENSOR_SUFFIXES]
    random.Random(order).shuffle(items)
    for shard_id, suffix, tensor in items:
        if edit is not None:
            tensor = edit(shard_id, suffix, tensor)
        if tensor is not None:
            param = getattr(layer, suffix)
            param.weight_loader(param, tensor, shard_id)
    return method, layer


@pytest.fixture(scope="module")
def qkv_shards():
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(64, generator=gen)
    return [random_packed(n, 64, sfmp_config(QKV), gen, perm) for n in (64, 32, 32)]


@pytest.mark.parametrize("order", [0, 1])
def test_shards_in_any_order_then_one_fused_op(qkv_shards, order):
    method, layer = _loaded_layer(qkv_shards, order)
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "_sfmp_loaded")  # raw tensors dropped after the one-time build
    x, bias = torch.randn(5, 64), torch.randn(128)
    ref = torch.cat([sfmp_linear_reference(x, s, sfmp_config(QKV), "dequant")
                     for s in qkv_shards], -1) + bias
    torch.testing.assert_close(method.apply(layer, x, bias), ref, rtol=1e-5, atol=1e-5)


def test_corrupted_or_missing_tensor_names_layer_and_tensor(qkv_shards):
    def nan_alpha(shard_id, suffix, t):
        return t.index_fill(0, torch.tensor([0]), float("nan")) if (shard_id, suffix) == (
            "k", "alpha") else t
    method, layer = _loaded_layer(qkv_shards, 0, nan_alpha)
    with pytest.raises(FormatError, match=rf"layer {QKV[1]}: tensor {QKV[1]}.alpha: .*NaN"):
        method.process_weights_after_loading(layer)

    def drop_perm(shard_id, suffix, t):
        return None if (shard_id, suffix) == ("v", "output_perm") else t
    method, layer = _loaded_layer(qkv_shards, 0, drop_perm)
    with pytest.raises(FormatError, match=rf"layer {QKV[2]}: missing .*{QKV[2]}.output_perm"):
        method.process_weights_after_loading(layer)


def test_wrong_shape_or_shard_id_is_rejected(qkv_shards):
    cfg = _quant_config()
    method = cfg.get_quant_method(FakeLinear(), f"{ATTN}.qkv_proj")
    layer = FakeLinear()
    method.create_weights(layer, 64, [64, 32, 40], 64, 136, torch.float32)
    with pytest.raises(FormatError, match="expected one of"):
        layer.qweight.weight_loader(layer.qweight, qkv_shards[0].qweight, 7)
    for i, shard_id in enumerate("qkv"):
        for suffix in TENSOR_SUFFIXES:
            getattr(layer, suffix).weight_loader(getattr(layer, suffix),
                                                 getattr(qkv_shards[i], suffix), shard_id)
    with pytest.raises(FormatError, match=r"\[32, 64\] in the checkpoint but \[40, 64\]"):
        method.process_weights_after_loading(layer)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_each_tensor_parallel_rank_loads_and_serves_only_its_ranges(order):
    """vLLM's loaders hand every rank the whole tensors, in the checkpoint's order or any other
    (qweight before block_offsets waits for them): each rank keeps its ranges and its op gives
    its rows of q/k/v, or its partial sum of o_proj, of the full layers' outputs."""
    from sfmp_serve.format import SFMPConfig
    from sfmp_serve.ops.reference import dequantize
    from tests.offline.helpers import make_config
    from tests.offline.helpers import random_packed as random_ranges

    o_proj = f"{ATTN}.o_proj"
    ranges = {"self_attn.q_proj": ("out", 4), "self_attn.k_proj": ("out", 2),
              "self_attn.v_proj": ("out", 2), "self_attn.o_proj": ("in", 4)}
    base = make_config(group_size=16, block_rows=8, bit_choices=(2, 3, 4),
                       modules=(*QKV, o_proj))
    config = SFMPConfig.from_dict({**base.to_dict(), "tp_shards": 4, "tp_ranges": ranges,
                                   "input_groups": [["self_attn.q_proj", "self_attn.k_proj",
                                                     "self_attn.v_proj"],
                                                    ["self_attn.o_proj"]]})
    qkv = [random_ranges(n, 88, config, seed=7, ranges=(r, 1))[0]
           for n, r in ((96, 4), (48, 2), (48, 2))]
    for shard in qkv[1:]:
        shard.input_perm = qkv[0].input_perm  # one input group: one input order
    o, _ = random_ranges(88, 96, config, seed=8, ranges=(1, 4))  # 24 inputs per range: ragged
    x, h = torch.randn(3, 88), torch.randn(3, 96)
    full_qkv = [sfmp_linear_reference(x, s, config, "dequant") for s in qkv]
    w_o = dequantize(o, config, torch.float64)
    quant = SFMPQuantConfig(config)
    for tp in (2, 4):
        partial = torch.zeros(3, 88, dtype=torch.float64)
        for rank in range(tp):
            for prefix, shards, ids in ((f"{ATTN}.qkv_proj", qkv, "qkv"), (o_proj, [o], [None])):
                layer = FakeLinear()
                layer.tp_size, layer.tp_rank = tp, rank
                method = quant.get_quant_method(FakeLinear(), prefix)
                method.prefix = f"{prefix}@{tp}.{rank}"  # one prepared op per simulated rank
                if prefix == o_proj:
                    method.create_weights(layer, 96 // tp, [88], 96, 88, torch.float32)
                else:
                    sizes = [96 // tp, 48 // min(tp, 2), 48 // min(tp, 2)]
                    method.create_weights(layer, 88, sizes, 88, 192, torch.float32)
                items = [(i, s) for i in range(len(shards)) for s in TENSOR_SUFFIXES]
                if order:
                    random.Random(order).shuffle(items)
                for i, suffix in items:
                    param = getattr(layer, suffix)
                    param.weight_loader(param, getattr(shards[i], suffix), ids[i])
                method.process_weights_after_loading(layer)
                if prefix == o_proj:
                    cols = slice(rank * 96 // tp, (rank + 1) * 96 // tp)
                    y = method.apply(layer, h[:, cols]).double()
                    torch.testing.assert_close(y, h[:, cols].double() @ w_o[:, cols].t(),
                                               rtol=1e-4, atol=1e-4)
                    partial += y
                else:
                    kv = rank * 2 // tp  # KV head of this rank (replicated at TP 4)
                    want = torch.cat([full_qkv[0][:, rank * 96 // tp:(rank + 1) * 96 // tp],
                                      *(f[:, kv * 24:(kv + 1) * 24] for f in full_qkv[1:])], 1)
                    torch.testing.assert_close(method.apply(layer, x), want, rtol=1e-4,
                                               atol=1e-4)
        torch.testing.assert_close(partial, h.double() @ w_o.t(), rtol=1e-4, atol=1e-4)
