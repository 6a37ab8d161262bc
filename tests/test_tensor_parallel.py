"""Tensor-parallel ranges (format version 4, sfmp_serve/tp.py): the geometry of ranges, what each
rank keeps of every stored tensor, and that the slices run through the op give exactly the
rank's part of the full layer (column-parallel: its rows; row-parallel: partial sums that add up
to the full output)."""

from __future__ import annotations

import pytest
import torch

from offline.pipeline import QuantizeOptions, quantize_model
from offline.tp_plan import LinearShape, plan_tp
from sfmp_serve.arch import LLAMA_LIKE, PHI3
from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import TENSOR_SUFFIXES, LayerGeometry, PackedLinear, SFMPConfig
from sfmp_serve.ops import api
from sfmp_serve.ops.reference import dequantize, sfmp_linear_reference
from sfmp_serve.tp import (check_tensor_parallel, localize, narrow, parts, rank_share,
                           serving_parts)
from tests.offline.helpers import make_config, random_packed
from tests.tiny import make_tiny_model

CONFIG = make_config(group_size=16, block_rows=8, bit_choices=(2, 3, 4, 8))


def rank_slice(packed: PackedLinear, config: SFMPConfig, split: tuple[str, int], tp: int,
               rank: int) -> PackedLinear:
    """What the vLLM weight loader keeps on `rank`: every tensor narrowed as it arrives
    (block_offsets before qweight, the checkpoint's sorted order), then localized."""
    geo = packed.geometry(config)
    share = rank_share("lin", split, tp, rank)
    kept = {s: narrow(s, getattr(packed, s), geo, share, packed.block_offsets)
            for s in TENSOR_SUFFIXES}
    local = PackedLinear(**kept, ranges=packed.ranges)
    local = localize(local, geo, share)
    local.validate("lin", config)
    return local


def test_geometry_of_ranges_lays_a_grid_per_range() -> None:
    geo = LayerGeometry(40, 50, 16, 8, 2, 1)  # two row ranges of 20 rows: 8, 8, 4 each
    assert geo.rows().tolist() == [8, 8, 4, 8, 8, 4]
    assert geo.cols().tolist() == [16, 16, 16, 2]
    geo = LayerGeometry(40, 50, 16, 8, 1, 2)  # two column ranges of 25 inputs: 16, 9 each
    assert geo.cols().tolist() == [16, 9, 16, 9]
    assert geo.col_group_index().tolist() == [0] * 16 + [1] * 9 + [2] * 16 + [3] * 9
    # storage order: part after part, so range 1's blocks follow all of range 0's
    bits = torch.full((geo.n_block_rows, geo.n_groups), 1, dtype=torch.uint8)
    offsets, total = geo.offsets(bits)
    words = geo.block_words(bits)
    assert int(offsets[0, 2]) == int(words[:, :2].sum())
    assert total == int(words.sum())
    with pytest.raises(FormatError, match="50 inputs cannot be cut into 3 equal ranges"):
        LayerGeometry(40, 50, 16, 8, 1, 3)


@pytest.mark.parametrize("ranges", [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4)])
def test_parts_are_plain_linears_of_the_same_weight(ranges: tuple[int, int]) -> None:
    packed, _ = random_packed(40, 72, CONFIG, seed=3, bias=True, ranges=ranges)
    packed.validate("lin", CONFIG)
    w = dequantize(packed, CONFIG, torch.float64)
    pieces = parts(packed, CONFIG)
    assert len(pieces) == ranges[0] * ranges[1]
    rows, cols = 40 // ranges[0], 72 // ranges[1]
    for index, piece in enumerate(pieces):
        piece.validate("piece", CONFIG)  # a version 3 linear: one range, its own offsets
        i, j = divmod(index, ranges[1])
        expected = w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
        assert torch.equal(dequantize(piece, CONFIG, torch.float64), expected)


def test_a_permutation_leaving_its_range_is_refused() -> None:
    packed, _ = random_packed(40, 72, CONFIG, seed=4, ranges=(2, 1))
    perm = packed.output_perm.clone()
    perm[[0, 39]] = perm[[39, 0]]
    packed.output_perm = perm
    with pytest.raises(FormatError, match="output_perm: entry 0 = .* leaves its "
                                          "tensor-parallel range 0 of 2"):
        packed.validate("lin", CONFIG)


CASES = [  # (rows, inputs, split, tensor parallel sizes)
    (48, 72, ("out", 4), (2, 4)),  # column-parallel: q / gate / up
    (48, 72, ("out", 2), (2, 4)),  # a K/V projection with 2 KV heads: replicated at tp 4
    (48, 88, ("in", 4), (2, 4)),  # row-parallel, ranges of 22 inputs: ragged groups, widened
    (48, 20, ("in", 4), (2, 4)),  # row-parallel, ranges of 5 inputs: one call per range
    (48, 128, ("in", 4), (2, 4)),  # row-parallel, ranges of whole groups: joined at load
]


def check_ranks(packed: PackedLinear, config: SFMPConfig, split: tuple[str, int],
                sizes: tuple[int, ...]) -> None:
    """At each tensor parallel size, every rank's slice through the op is its part of the
    full layer's output (reference op on the whole stored linear)."""
    rows, inputs = packed.out_features, packed.in_features
    x = torch.randn(5, inputs, dtype=torch.float32)
    full = sfmp_linear_reference(x.double(), packed, config, mode="dequant")
    w = dequantize(packed, config, torch.float64)
    for tp in sizes:
        total = torch.zeros_like(full)
        for rank in range(tp):
            local = rank_slice(packed, config, split, tp, rank)
            share = rank_share("lin", split, tp, rank)
            name = f"tp-test-{rows}-{inputs}-{split}-{tp}-{rank}"
            api.prepare_layer(name, ("lin",), (local,), config, torch.float32, "cpu")
            try:
                if split[0] == "out":
                    size = rows // share.n
                    part = slice(share.first * size, (share.first + share.count) * size)
                    y = api.linear(x, api.LayerHandle(name, part.stop - part.start, "", 0))
                    torch.testing.assert_close(y.double(), full[:, part], rtol=1e-4, atol=1e-4)
                else:
                    size = inputs // share.n
                    cols = slice(share.first * size, (share.first + share.count) * size)
                    y = api.linear(x[:, cols], api.LayerHandle(name, rows, "", 0))
                    expected = x[:, cols].double() @ w[:, cols].t()
                    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
                    total += y.double()
            finally:
                api.release_layer(name)
        if split[0] == "in":  # vLLM's all-reduce of the partial sums gives the full output
            torch.testing.assert_close(total, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,inputs,split,sizes", CASES)
def test_each_rank_computes_its_part_of_the_full_layer(rows: int, inputs: int,
                                                       split: tuple[str, int],
                                                       sizes: tuple[int, ...]) -> None:
    ranges = (split[1], 1) if split[0] == "out" else (1, split[1])
    packed, _ = random_packed(rows, inputs, CONFIG, seed=5, ranges=ranges)
    check_ranks(packed, CONFIG, split, sizes)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("shards", [2, 4])
def test_quantized_models_split_into_rank_slices(tmp_path, arch: str, shards: int) -> None:
    """Tiny GQA models (4 heads, 2 KV heads; widths 192 and 320, not multiples of 128) quantized
    with --tp-shards 2 and 4: every linear, at every tensor parallel size dividing K."""
    model = make_tiny_model(tmp_path / "m", arch, hidden=192, intermediate=320, heads=4,
                            kv_heads=2, layers=1, head_dim=48)
    result = quantize_model(model, QuantizeOptions(bits=3.5, budget_gb=None, method="rtn",
                                                   tp_shards=shards))
    config = result.config
    assert config.tp_shards == shards and config.format_version == 4
    assert config.tp_ranges == {
        "self_attn.q_proj": ("out", shards), "self_attn.k_proj": ("out", 2),
        "self_attn.v_proj": ("out", 2), "self_attn.o_proj": ("in", shards),
        "mlp.gate_proj": ("out", shards), "mlp.up_proj": ("out", shards),
        "mlp.down_proj": ("in", shards)}
    for name, packed in result.packed.items():
        packed.validate(name, config)
        split = config.split_of(name)
        check_ranks(packed, config, split, tuple(t for t in (2, 4) if shards % t == 0))


def test_input_ranges_are_joined_widened_or_summed() -> None:
    joined, _ = random_packed(48, 128, CONFIG, seed=6, ranges=(1, 4))  # 32 = 2 groups each
    (part,) = serving_parts(("lin",), (joined,), CONFIG)
    assert part.gather is None and part.shards[0].in_features == 128
    ragged, _ = random_packed(48, 88, CONFIG, seed=6, ranges=(1, 4))  # 22 = 16 + 6: widened
    (part,) = serving_parts(("lin",), (ragged,), CONFIG)  # to 32 (1.45x) and joined
    assert part.shards[0].in_features == 128 and part.gather.tolist()[16:34] == [
        16, 17, 18, 19, 20, 21] + [88] * 10 + [22, 23]
    thin, _ = random_packed(48, 20, CONFIG, seed=6, ranges=(1, 4))  # 5 -> 16 would be 3.2x:
    assert [(p.start, p.stop) for p in serving_parts(("lin",), (thin,), CONFIG)] == [
        (0, 5), (5, 10), (10, 15), (15, 20)]  # one call per range, summed
    outputs, _ = random_packed(48, 88, CONFIG, seed=6, ranges=(4, 1))
    (only,) = serving_parts(("lin",), (outputs,), CONFIG)  # side by side, like fused q/k/v
    assert len(only.shards) == 4


def test_tensor_parallel_size_must_divide_the_checkpoints_shards() -> None:
    config = SFMPConfig(**{**make_config().to_dict(), "format_version": 3})
    with pytest.raises(SFMPError, match="tensor parallel size 2 does not divide the "
                                        "checkpoint's tp_shards=1 .*format version 3"):
        check_tensor_parallel(config, 2)
    config = SFMPConfig.from_dict({**make_config().to_dict(), "tp_shards": 4})
    check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 4)
    with pytest.raises(SFMPError, match="tensor parallel size 3 does not divide the "
                                        "checkpoint's tp_shards=4 .*--tp-shards 4"):
        check_tensor_parallel(config, 3)


def test_rank_share_errors_name_the_layer_and_numbers() -> None:
    with pytest.raises(SFMPError, match="layer m.o_proj: stored as one tensor-parallel range"):
        rank_share("m.o_proj", None, 2, 0)
    with pytest.raises(SFMPError, match="layer m.down_proj: its 4 tensor-parallel ranges "
                                        "cannot be shared by 8 ranks"):
        rank_share("m.down_proj", ("in", 4), 8, 0)
    assert rank_share("m.k_proj", ("out", 2), 8, 5).first == 1  # KV head 1 on ranks 4..7


def test_config_records_ranges_only_from_version_4() -> None:
    base = make_config().to_dict()
    with pytest.raises(FormatError, match="tp_shards=2: needs format version 4"):
        SFMPConfig.from_dict({**base, "format_version": 3, "tp_shards": 2})
    with pytest.raises(FormatError, match=r"tp_ranges.mlp.down_proj=\['in', 3\]: expected"):
        SFMPConfig.from_dict({**base, "tp_shards": 4, "tp_ranges": {"mlp.down_proj": ["in", 3]}})
    config = SFMPConfig.from_dict({**base, "tp_shards": 4,
                                   "tp_ranges": {"mlp.down_proj": ["in", 4]}})
    assert config.ranges_of("model.layers.7.mlp.down_proj") == (1, 4)
    assert config.ranges_of("model.layers.7.mlp.up_proj") == (1, 1)
    assert SFMPConfig.from_dict(config.to_dict()) == config


def _llama_shapes(hidden: int, intermediate: int, heads: int,
                  kv_heads: int) -> list[LinearShape]:
    head = hidden // heads
    return [LinearShape("self_attn.q_proj", hidden, hidden),
            LinearShape("self_attn.k_proj", kv_heads * head, hidden),
            LinearShape("self_attn.v_proj", kv_heads * head, hidden),
            LinearShape("self_attn.o_proj", hidden, hidden),
            LinearShape("mlp.gate_proj", intermediate, hidden),
            LinearShape("mlp.up_proj", intermediate, hidden),
            LinearShape("mlp.down_proj", hidden, intermediate)]


def test_shards_the_model_cannot_take_are_refused_naming_layer_and_numbers(caplog):
    smollm = {"num_attention_heads": 9, "num_key_value_heads": 3}
    with pytest.raises(SFMPError, match="--tp-shards 8: layer self_attn.q_proj has 9 attention "
                                        "heads, which cannot be split into 8 equal"):
        plan_tp(8, LLAMA_LIKE, smollm, _llama_shapes(576, 1536, 9, 3))
    with pytest.raises(SFMPError, match="--tp-shards 2: layer mlp.gate_proj has 201 rows"):
        plan_tp(2, LLAMA_LIKE, {"num_attention_heads": 4, "num_key_value_heads": 2},
                _llama_shapes(128, 201, 4, 2))
    with pytest.raises(SFMPError, match="--tp-shards 4: layer self_attn.k_proj has 3 KV heads"):
        plan_tp(4, LLAMA_LIKE, {"num_attention_heads": 12, "num_key_value_heads": 3},
                _llama_shapes(384, 512, 12, 3))
    with pytest.raises(SFMPError, match="layer self_attn.qkv_proj of a Phi-3 model has no "
                                        "tensor-parallel split"):
        plan_tp(2, PHI3, {"num_attention_heads": 4},
                [LinearShape("self_attn.qkv_proj", 384, 128)])
    # the default: 8 where it fits, else the largest that does, with the reason logged
    assert plan_tp(None, LLAMA_LIKE, {"num_attention_heads": 32, "num_key_value_heads": 8},
                   _llama_shapes(4096, 14336, 32, 8)).shards == 8
    with caplog.at_level("INFO"):
        plan = plan_tp(None, LLAMA_LIKE, smollm, _llama_shapes(576, 1536, 9, 3))
    assert plan.shards == 3 and "9 attention heads" in caplog.text
    assert plan.ranges["self_attn.k_proj"] == ("out", 3)
    assert plan_tp(None, PHI3, {}, [LinearShape("self_attn.qkv_proj", 384, 128)]).shards == 1
    # fewer KV heads than shards: one range per KV head (vLLM replicates them)
    assert plan_tp(8, LLAMA_LIKE, {"num_attention_heads": 32, "num_key_value_heads": 4},
                   _llama_shapes(4096, 14336, 32, 4)).ranges["self_attn.v_proj"] == ("out", 4)


def test_cli_refuses_shards_the_model_cannot_take_in_one_line(tmp_path, capsys):
    from sfmp_serve.cli import main as cli_main

    model = make_tiny_model(tmp_path / "m", "llama", hidden=96, intermediate=200, heads=3,
                            kv_heads=1, layers=1)
    assert cli_main.main(["quantize", str(model), "--bits", "3", "--method", "rtn",
                          "--tp-shards", "2", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert err.startswith("sfmp quantize: error: --tp-shards 2: layer self_attn.q_proj has 3 "
                          "attention heads")
    assert not (tmp_path / "q").exists()
