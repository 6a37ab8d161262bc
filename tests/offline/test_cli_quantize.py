"""`sfmp quantize` end to end on tiny models, and every bad input as a one-line CLI error."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline.model_io import load_model
from sfmp_serve.cli.main import main
from sfmp_serve.format import load_checkpoint
from sfmp_serve.ops.reference import dequantize

# RTN: these tests are about the CLI; 128 calibration tokens are too few for GPTQ, the default
FAST = ["--method", "rtn", "--group-size", "32", "--block-rows", "16", "--nsamples", "4",
        "--seqlen", "32"]


def quantize(model, out, *flags):
    return main(["quantize", str(model), *flags, *FAST, "--out", str(out)])


def tensor_bytes(out):
    return sum(t.numel() * t.element_size()
               for t in load_file(out / "model.safetensors").values())


def check_matches_model(out, model_dir):
    """Every quantized linear dequantizes to within half a step of the original weight."""
    ckpt = load_checkpoint(out)
    loaded = load_model(model_dir)
    ckpt.validate(loaded.targets.shapes())
    assert set(ckpt.config.quantized_modules) == set(loaded.targets.targets)
    for name in loaded.targets.targets:
        p = ckpt.packed(name)
        weight = loaded.model.get_submodule(name).weight.detach()
        w_r = weight[p.output_perm.long()][:, p.input_perm.long()]
        deq_r = dequantize(p, ckpt.config, torch.float32, reordered=True)
        # groups as the geometry lays them (tensor-parallel ranges end in a ragged group)
        half_step = p.alpha.float().repeat_interleave(p.geometry(ckpt.config).cols(), 1)
        assert ((deq_r - w_r).abs() <= half_step * 1.01 + 1e-6).all(), name
    return ckpt


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen3"])
def test_quantize_end_to_end(request, tmp_path, capsys, arch):
    model = request.getfixturevalue(arch)
    assert quantize(model, tmp_path / "q", "--bits", "3.25") == 0
    ckpt = check_matches_model(tmp_path / "q", model)
    cfg = ckpt.config
    assert abs(cfg.avg_bits - 3.25) <= 0.01 and cfg.bit_choices == (3, 4)
    assert cfg.target_bits == 3.25 and cfg.method == "rtn" and cfg.act_dtype == "float32"
    assert cfg.calibration["source"] == "model-samples" and cfg.calibration["nsamples"] == 4
    for group in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), (
            "mlp.gate_proj", "mlp.up_proj"):
        perms = [ckpt.packed(f"model.layers.1.{n}").input_perm for n in group]
        assert all(torch.equal(perms[0], p) for p in perms[1:])
    # tied embeddings: lm_head is not stored; the config stays a transformers config
    assert "lm_head.weight" not in ckpt.tensors and "model.embed_tokens.weight" in ckpt.tensors
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    orig = json.loads((model / "config.json").read_text())
    assert set(orig) <= set(hf) and hf["quantization_config"]["quant_method"] == "sfmp"
    from transformers import AutoConfig, AutoTokenizer
    assert AutoConfig.from_pretrained(tmp_path / "q").model_type == orig["model_type"]
    assert AutoTokenizer.from_pretrained(tmp_path / "q").chat_template
    assert (tmp_path / "q" / "generation_config.json").is_file()
    out = capsys.readouterr().out
    assert "stage times:" in out and "salience" in out and "total" in out


def test_three_levels_budget_and_uniform(tmp_path, tiny_llama):
    assert quantize(tiny_llama, tmp_path / "l3", "--bits", "3.0", "--levels", "3",
                    "--bit-choices", "2,3,4") == 0
    cfg = load_checkpoint(tmp_path / "l3").config
    assert cfg.bit_choices == (2, 3, 4) and abs(cfg.avg_bits - 3.0) <= 0.01

    sizes = {}
    for bits in (3, 4):
        assert quantize(tiny_llama, tmp_path / f"u{bits}", "--bits", str(bits), "--uniform") == 0
        sizes[bits] = tensor_bytes(tmp_path / f"u{bits}")
    ckpt = load_checkpoint(tmp_path / "u4")
    p = ckpt.packed("model.layers.0.mlp.down_proj")
    assert (p.block_bits == 4).all() and torch.equal(p.input_perm.long(),
                                                     torch.arange(p.in_features))

    budget = (sizes[3] + sizes[4]) // 2
    assert quantize(tiny_llama, tmp_path / "b", "--budget-gb", str(budget / 1e9)) == 0
    cfg = load_checkpoint(tmp_path / "b").config
    assert sizes[3] < tensor_bytes(tmp_path / "b") <= budget
    assert 3.3 < cfg.avg_bits < 3.7 and cfg.method_args["budget_gb"] == budget / 1e9
    assert ckpt.config.calibration["source"] == "none"


def test_bf16_model_and_text_calibration(tmp_path):
    from tests.tiny import CORPUS, make_tiny_model
    model = make_tiny_model(tmp_path / "m", dtype=torch.bfloat16)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS))
    assert quantize(model, tmp_path / "q", "--bits", "2.5", "--calib", str(calib)) == 0
    ckpt = load_checkpoint(tmp_path / "q")
    assert ckpt.config.act_dtype == "bfloat16"
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert ckpt.packed("model.layers.0.self_attn.q_proj").alpha.dtype == torch.bfloat16
    assert ckpt.config.calibration["source"] == str(calib)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_llama):
    """name -> (args without --out); files created once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    (d / "gpt2").mkdir()
    (d / "gpt2" / "config.json").write_text(
        '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    nan = d / "nan"
    shutil.copytree(tiny_llama, nan)
    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("Paris.")
    m = str(tiny_llama)
    return {
        "missing model": ([str(d / "nope"), "--bits", "3"], "does not exist"),
        "not causal lm": ([str(d / "bert"), "--bits", "3"], "not a causal LM"),
        "unsupported arch": ([str(d / "gpt2"), "--bits", "3"], "'gpt2' is not supported"),
        "nan weights": ([str(nan), "--bits", "3"], "up_proj.weight contains NaN or Inf"),
        "bits outside choices": ([m, "--bits", "5", "--levels", "3", "--bit-choices", "2,3,4"],
                                 r"--bits=5.0: outside the bit choices \[2, 4\]"),
        "bits too high": ([m, "--bits", "9"], "--bits=9.0: must be in 1..8"),
        "levels vs choices": ([m, "--bits", "3", "--bit-choices", "2,3,4"],
                              "3 choices, but --levels=2"),
        "budget too small": ([m, "--budget-gb", "0.00001"],
                             r"--budget-gb=1e-05: too small.*needs 0\.000\d+ GB \(\d+ bytes\)"),
        "group size zero": ([m, "--bits", "3", "--group-size", "0"], "--group-size=0"),
        "group size odd": ([m, "--bits", "3", "--group-size", "12"], "multiple of 8"),
        "block rows negative": ([m, "--bits", "3", "--block-rows", "-4"], "--block-rows=-4"),
        "calib missing": ([m, "--bits", "3", "--calib", str(d / "no.txt")], "does not exist"),
        "calib empty": ([m, "--bits", "3", "--calib", str(d / "empty.txt")], "empty"),
        "calib too short": ([m, "--bits", "3", "--calib", str(d / "short.txt")], "too short"),
        "uniform fractional": ([m, "--bits", "3.5", "--uniform"], "integer"),
        "unknown method": ([m, "--bits", "3", "--method", "magic"], "--method='magic'"),
    }


@pytest.mark.parametrize("case", [
    "missing model", "not causal lm", "unsupported arch", "nan weights", "bits outside choices",
    "bits too high", "levels vs choices", "budget too small", "group size zero",
    "group size odd", "block rows negative", "calib missing", "calib empty", "calib too short",
    "uniform fractional", "unknown method"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, bad_inputs, case):
    args, match = bad_inputs[case]
    out = tmp_path / "out"
    rc = main(["quantize", *FAST, *args, "--out", str(out)])  # the case's flags win
    err = capsys.readouterr().err.strip()
    assert rc == 2
    # the error is the last line (progress bars may precede it) and the only one
    assert err.splitlines()[-1].startswith("sfmp quantize: error: "), err
    assert err.count("error:") == 1, err
    assert re.search(match, err.splitlines()[-1]), err
    assert list(tmp_path.iterdir()) == []  # no output and no temporary directory


def test_existing_output_needs_overwrite(tmp_path, capsys, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert quantize(tiny_llama, out, "--bits", "4") == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert quantize(tiny_llama, out, "--bits", "4", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and load_checkpoint(out).config.avg_bits == 4.0
    assert main(["quantize", str(tiny_llama), "--bits", "4", "--out", str(tiny_llama),
                 "--overwrite"]) == 2


def test_interrupt_while_writing_leaves_nothing(tmp_path, monkeypatch, capsys, tiny_llama):
    import sfmp_serve.weights_file as weights_file

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_file, "write_safetensors", interrupted)
    assert quantize(tiny_llama, tmp_path / "out", "--bits", "3") == 130
    assert list(tmp_path.iterdir()) == []


def test_cli_defaults_match_the_pipeline():
    from offline import pipeline
    from sfmp_serve.cli import quantize as cli
    assert (cli.DEFAULT_NSAMPLES, cli.DEFAULT_SEQLEN) == (pipeline.DEFAULT_NSAMPLES,
                                                          pipeline.DEFAULT_SEQLEN)


@pytest.mark.gpu
def test_quantize_on_cuda(tmp_path, tiny_qwen3):
    assert quantize(tiny_qwen3, tmp_path / "q", "--bits", "3.25", "--device", "cuda") == 0
    check_matches_model(tmp_path / "q", tiny_qwen3)
