import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_runs_for_the_reference_bpw_targets(quality):
    runs = quality.plan_runs([2.5, 3.0, 3.5, 4.0], ["rtn", "gptq"], overhead=0.25)
    sfmp = sorted({r.bits for r in runs if r.family == "sfmp"})
    uniform = sorted({r.bits for r in runs if r.family == "uniform"})
    assert sfmp == [2.25, 2.75, 3.25, 3.75]  # BPW minus the overhead
    assert uniform == [2.0, 3.0, 4.0]  # nearest integer bits; 3.0 and 3.5 share 3 bits
    assert len(runs) == 2 * (4 + 3)


def test_a_named_setting_labels_its_runs_and_clips_only_where_a_method_can(quality):
    setting = quality.Setting("pert", policy="perturbation", levels=3, clip="minmax")
    runs = quality.plan_runs([3.5], ["rtn", "awq"], 0.25, setting=setting, families=("sfmp",))
    assert [r.label for r in runs] == ["sfmp-rtn-3.25@pert", "sfmp-awq-3.25@pert"]
    assert setting.method_args("rtn") == setting.method_args("gptq") == {"clip": "minmax"}
    assert setting.method_args("awq") == {}  # AWQ keeps its own output-error clipping search
    assert quality.Setting().method_args("gptq") == {}  # the method's default


def test_overhead_is_what_a_checkpoint_stores_beyond_its_codes(quality, tiny_llama, tmp_path):
    from sfmp_serve.cli.main import main
    from sfmp_serve.format import load_checkpoint

    out = tmp_path / "rtn"
    assert main(["quantize", str(tiny_llama), "--bits", "3", "--uniform", "--group-size", "32",
                 "--block-rows", "16", "--out", str(out)]) == 0
    config = load_checkpoint(out).config
    overhead, slope = quality.storage_line(str(tiny_llama), 32, 16)
    assert slope > 1  # 200-wide inputs: the last group of 8 is padded to a 32-bit word
    assert overhead + 3 * slope == pytest.approx(config.bits_per_weight, abs=1e-5)


def test_heldout_text_ships_with_an_installed_package(quality):
    path = quality.default_heldout_text()
    assert path.stat().st_size > 100_000 and "OPTICKS" in path.read_text()[:2000]


def test_quality_table_and_plot_on_a_tiny_model(quality, tiny_llama, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(["The capital of France is Paris, and the capital of Italy is "
                              "Rome."] * 40))
    out = tmp_path / "out"
    argv = ["--model", str(tiny_llama), "--out", str(out), "--work", str(tmp_path / "work"),
            "--text", str(text), "--bpw", "5.5", "--methods", "rtn,gptq", "--group-size", "32",
            "--block-rows", "16", "--nsamples", "4", "--calib-seqlen", "64",
            "--eval-seqlen", "64", "--max-tokens", "256"]
    assert quality.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = quality.plan_runs([5.5], ["rtn", "gptq"],
                             *quality.storage_line(str(tiny_llama), 32, 16))
    assert {r.label for r in runs} | {"baseline", "meta"} == set(results)
    for run in runs:
        record = results[run.label]
        assert record["ppl"] > 1 and record["quant_seconds"] >= 0
        assert abs(record["avg_bits"] - run.bits) <= 0.01
        assert abs(record["bpw"] - 5.5) < 0.5  # the nearest configuration to the target
    table = (out / "quality.md").read_text()
    assert table.count("\n| ") == 1 + 1 + 4  # header row, baseline, four runs
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in (tmp_path / "work").iterdir() if p.is_dir()]  # checkpoints removed
    assert (tmp_path / "work" / "salience.safetensors").is_file()  # one Fisher pass, reused
    (out / "quality.md").unlink()
    assert quality.main([*argv, "--report-only", "--bpw", "2.5"]) == 0  # runs nothing new
    assert (out / "quality.md").read_text() == table
    assert json.loads((out / "results.json").read_text()) == results


@pytest.fixture(scope="module")
def ablation(quality):
    spec = importlib.util.spec_from_file_location("bench_ablation", ROOT / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = quality  # what ablation.py imports from its own folder
    spec.loader.exec_module(module)
    return module


def test_ablation_swaps_change_only_what_they_name(ablation, tiny_llama):
    from unittest import mock

    import torch

    from offline import pipeline
    from offline.pipeline import QuantizeOptions, quantize_model

    options = dict(bits=3.5, budget_gb=None, method="rtn", policy="salience", group_size=32,
                   block_rows=16,
                   nsamples=2, seqlen=32)
    full = quantize_model(tiny_llama, QuantizeOptions(**options))
    with mock.patch.object(pipeline, "salience_orders", ablation.identity_orders):
        plain = quantize_model(tiny_llama, QuantizeOptions(**options))
    with mock.patch.object(pipeline.alloc, "block_sums", ablation.random_block_sums(0)):
        shuffled = quantize_model(tiny_llama, QuantizeOptions(**options))
    name = "model.layers.0.mlp.down_proj"
    identity = torch.arange(full.packed[name].in_features, dtype=torch.int32)
    assert not torch.equal(full.packed[name].input_perm, identity)
    assert torch.equal(plain.packed[name].input_perm, identity)
    assert torch.equal(shuffled.packed[name].input_perm, full.packed[name].input_perm)
    # Same bit mix, placed elsewhere.
    bits = {r.config.avg_bits for r in (full, plain, shuffled)}
    assert max(bits) - min(bits) < 0.02
    assert any(not torch.equal(full.packed[n].block_bits, shuffled.packed[n].block_bits)
               for n in full.packed)


def test_float_offset_rtn_reproduces_a_q4_1_grid_that_integer_zero_rtn_does_not(ablation):
    from unittest import mock

    import torch

    from offline.quantizers import blockwise
    from offline.quantizers.base import LinearContext
    from offline.quantizers.rtn import RTNQuantizer
    from sfmp_serve.format import LayerGeometry

    gen = torch.Generator().manual_seed(0)
    d = torch.rand(64, 1, generator=gen) * 0.01 + 0.001
    m = -torch.rand(64, 1, generator=gen) * 0.05  # a float minimum, not a multiple of d
    q = torch.randint(0, 16, (64, 32), generator=gen)
    q[:, 0], q[:, 1] = 0, 15  # the block uses its whole range, as Q4_1 blocks do
    w = d * q + m
    geometry = LayerGeometry(64, 32, 32, 64)
    bits = torch.full((1, 1), 4, dtype=torch.uint8)

    def error():
        codes = RTNQuantizer().quantize(w, bits, geometry, LinearContext())
        deq = (codes.codes.float() - codes.zero) * codes.scale
        return (deq - w).abs().max().item()

    assert error() > 1e-4
    with mock.patch.object(blockwise, "minmax_params", ablation.float_offset_params), \
            mock.patch.object(blockwise, "quantize_codes", ablation.float_offset_codes):
        assert error() < 1e-6
