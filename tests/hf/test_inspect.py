"""sfmp inspect: numbers recomputed independently from the model and the files."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from sfmp_serve.cli.main import main
from sfmp_serve.format import WEIGHTS_FILE


def expected_numbers(model_dir, ckpt):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    original = sum(v.numel() * 4 for v in state.values())  # float32 model
    n = code_bits = stored_bits = 0
    for p in ckpt.packed.values():
        rows = torch.tensor([min(16, p.out_features - r) for r in range(0, p.out_features, 16)])
        cols = torch.tensor([min(32, p.in_features - c) for c in range(0, p.in_features, 32)])
        code_bits += int((p.block_bits.long() * rows[:, None] * cols[None, :]).sum())
        stored_bits += 8 * sum(t.numel() * t.element_size() for t in (
            p.qweight, p.alpha, p.beta, p.block_bits, p.block_offsets))
        stored_bits += 16 * (p.out_features + p.in_features)  # uint16 permutations (v3)
        n += p.out_features * p.in_features
    return original, n, code_bits / n, stored_bits / n


def test_inspect_json(tiny_llama, llama_ckpt, capsys):
    assert main(["inspect", str(llama_ckpt.path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    original, n, avg_bits, bpw = expected_numbers(tiny_llama, llama_ckpt)
    assert got["size_bytes"] == (llama_ckpt.path / WEIGHTS_FILE).stat().st_size
    assert got["original_size_bytes"] == original
    assert got["quantized_weights"] == n
    assert got["avg_bits"] == pytest.approx(avg_bits)
    assert got["bits_per_weight"] == pytest.approx(bpw)
    assert 2 < got["avg_bits"] < 4 < got["bits_per_weight"]
    hist = got["bit_histogram"]
    assert set(hist) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"}
    assert sum(c for h in hist.values() for c in h.values()) == n
    assert sum(hist["k_proj"].values()) == 2 * 48 * 96


def test_inspect_text_and_plot(llama_ckpt, tmp_path, capsys):
    png = tmp_path / "bits.png"
    assert main(["inspect", str(llama_ckpt.path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "avg bits" in out and "q_proj" in out and "MB on disk" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_inspect_broken_checkpoint_one_line(llama_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(llama_ckpt.path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["block_rows"] = 8  # tables no longer match the tensors
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.layers.0.self_attn.q_proj.block_bits" in err
    assert main(["inspect", str(tmp_path / "missing")]) == 2


def test_inspect_shows_bits_per_expert(tmp_path, capsys):
    """A MoE checkpoint: the average bits of each expert (gate, up and down together), per
    sparse block, recomputed here from the block tables; expert projections are their own
    rows of the histogram; the heatmap gains the per-expert panel."""
    from offline.pipeline import QuantizeOptions, quantize_model, save_result
    from tests.tiny import make_family_model

    model_dir = make_family_model(tmp_path / "model", "qwen3_moe")
    options = QuantizeOptions(bits=3.5, budget_gb=None, levels=3, bit_choices=(2, 3, 4),
                              group_size=32, block_rows=16, nsamples=2, seqlen=16,
                              method="rtn")  # 32 tokens: too few for GPTQ (the default)
    result = quantize_model(model_dir, options)
    ckpt = save_result(result, model_dir, tmp_path / "ckpt")
    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    block = "model.layers.1.mlp"  # layer 0 is dense (mlp_only_layers)
    assert list(got["expert_bits"]) == [block]
    for e in range(4):
        code_bits = weights = 0
        for proj in ("gate_proj", "up_proj", "down_proj"):
            p = result.packed[f"{block}.experts.{e}.{proj}"]
            geo = p.geometry(result.config)
            sizes = geo.rows()[:, None] * geo.cols()[None, :]
            code_bits += int((p.block_bits.long() * sizes).sum())
            weights += p.out_features * p.in_features
        assert got["expert_bits"][block][str(e)] == pytest.approx(code_bits / weights)
    assert {"gate_proj", "experts.gate_proj", "experts.down_proj"} <= set(got["bit_histogram"])
    assert sum(got["bit_histogram"]["experts.up_proj"].values()) == 4 * 72 * 96
    png = tmp_path / "bits.png"
    assert main(["inspect", str(ckpt), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "average bits per expert" in out and block in out
    assert png.stat().st_size > 10_000
