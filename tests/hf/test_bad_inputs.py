"""Every bad input of issue 17 ends in one line naming the file, tensor or key and exit status
2, never a library traceback: damaged model directories for quantize and eval, damaged GGUF
files, damaged SFMP checkpoints for eval, inspect and both transformers loaders, and results
that are not finite."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from sfmp_serve.cli.main import main
from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.eval import hf_perplexity
from sfmp_serve.eval.windows import PplResult
from sfmp_serve.format import WEIGHTS_FILE
from sfmp_serve.hf import load_sfmp_model
from tests.corrupt import data_offset, edit_config, flip_byte, resigned_copy
from tests.tiny import CORPUS

NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(CORPUS[:5]))
    return path


def run_cli(capsys, *argv: str) -> str:
    """The one error line of a refused command (exit status 2, no traceback)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sfmp {argv[0]}: error: "), err
    assert err.count(f"sfmp {argv[0]}: error:") == 1, err
    return last


def plain_copy(model_dir, tmp_path, edit_tensors=None, **config_changes):
    """A copy of a plain HF model directory with its tensors and/or config.json edited."""
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    if edit_tensors is not None:
        tensors = load_file(out / WEIGHTS_FILE)
        edit_tensors(tensors)
        save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    if config_changes:
        edit_config(out, quantization=False, **config_changes)
    return out


def _truncate(path):
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _pickle_only(path):
    torch.save(load_file(path / WEIGHTS_FILE), path / "pytorch_model.bin")
    (path / WEIGHTS_FILE).unlink()


def _set(name, value):
    return lambda t: t[name].__setitem__(0, value)


MODEL_DIRS = {  # name -> (make the damaged copy, what the error says)
    "truncated weights": (lambda m, p: _truncate(plain_copy(m, p)),
                          r"model/model.safetensors: cannot read safetensors file \(.*"),
    "pickle only": (lambda m, p: _pickle_only(plain_copy(m, p)),
                    r"model: weights only in pickle form \(pytorch_model.bin\); sfmp reads "
                    "safetensors only"),
    "no weights": (lambda m, p: (plain_copy(m, p) / WEIGHTS_FILE).unlink(),
                   r"model: no weights \(\*.safetensors\)"),
    "heads do not divide hidden": (
        lambda m, p: plain_copy(m, p, num_attention_heads=5),
        r"model/config.json: transformers cannot use this config \(.*hidden size \(96\) is "
        r"not a multiple of the number of attention heads \(5\)"),
    "embedding shape vs config": (
        lambda m, p: plain_copy(m, p, vocab_size=400),
        r"model.safetensors: tensor model.embed_tokens.weight: shape \[384, 96\] in the "
        r"checkpoint, \[400, 96\] in the LlamaForCausalLM model of config.json"),
    "missing norm": (lambda m, p: plain_copy(m, p, lambda t: t.pop(NORM)),
                     rf"tensor {NORM}: missing from the checkpoint"),
    "not a causal lm": (lambda m, p: plain_copy(m, p, architectures=["LlamaModel"]),
                        r"model: not a causal LM \(architectures: LlamaModel\)"),
}


@pytest.mark.parametrize("case", sorted(MODEL_DIRS))
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_damaged_model_directory(tiny_llama, tmp_path, capsys, text, case, command):
    make, want = MODEL_DIRS[case]
    make(tiny_llama, tmp_path)
    model = str(tmp_path / "model")
    argv = (["quantize", model, "--bits", "3", "--out", str(tmp_path / "out")]
            if command == "quantize" else ["eval", "ppl", model, "--text", str(text)])
    assert_match(run_cli(capsys, *argv), want)
    assert not (tmp_path / "out").exists()


def assert_match(line: str, pattern: str) -> None:
    import re
    assert re.search(pattern, line), line


def test_nan_weights_stop_eval_before_a_nan_perplexity(tiny_llama, tmp_path, capsys, text):
    plain_copy(tiny_llama, tmp_path, _set(NORM, float("nan")))
    line = run_cli(capsys, "eval", "ppl", str(tmp_path / "model"), "--text", str(text))
    assert line.endswith(f"model: weight {NORM} contains NaN or Inf")


def test_overflowing_model_names_the_first_non_finite_window(tiny_llama, tmp_path, capsys,
                                                              text):
    """Finite weights whose activations overflow: perplexity is refused, not printed as nan."""
    plain_copy(tiny_llama, tmp_path, _set("model.layers.1.post_attention_layernorm.weight",
                                          3e38))
    line = run_cli(capsys, "eval", "ppl", str(tmp_path / "model"), "--text", str(text),
                   "--seqlen", "16")
    assert_match(line, r"window 1 of \d+ \(scored tokens 0..14\): the negative log-likelihood "
                       r"is nan; the model's outputs are not finite")


class NanAfter(nn.Module):
    """Uniform logits over 8 tokens, NaN from the `start`-th call on."""

    def __init__(self, start: int):
        super().__init__()
        self.start, self.calls = start, 0
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        self.calls += 1
        logits = torch.zeros(1, ids.shape[1], 8)
        if self.calls >= self.start:
            logits[0, -1, 0] = float("nan")  # the last position is not scored: no effect
            logits[0, 0, :] = float("nan")
        return type("Out", (), {"logits": logits})()


def test_first_non_finite_window_is_named():
    windows = [[0, 1, 2, 3]] * 5
    assert hf_perplexity(NanAfter(99), windows, 4, progress=False).ppl == pytest.approx(8.0)
    with pytest.raises(SFMPError, match=r"window 3 of 5 \(scored tokens 6..8\): the negative "
                                        r"log-likelihood is nan"):
        hf_perplexity(NanAfter(3), windows, 4, progress=False)


def test_perplexity_that_overflows_a_float_is_refused():
    assert PplResult.from_nll(700.0 * 10, 10, 16, 1).ppl == pytest.approx(math.exp(700))
    with pytest.raises(SFMPError, match=r"perplexity exp\(720\) over 10 tokens is not a finite"):
        PplResult.from_nll(7200.0, 10, 16, 1)


def _flip_qweight(path):
    flip_byte(path / WEIGHTS_FILE, data_offset(path / WEIGHTS_FILE,
                                               "model.layers.0.mlp.up_proj.qweight") + 5, 0x10)


CHECKPOINTS = {  # name -> (make the damaged copy, what the error says)
    "flipped qweight byte": (
        lambda c, p: _flip_qweight(_copy(c, p)),
        r"ckpt/model.safetensors: tensor model.layers.0.mlp.up_proj.qweight: checksum mismatch"),
    "missing norm": (lambda c, p: resigned_copy(c, p / "ckpt", lambda t: t.pop(NORM)),
                     rf"ckpt: tensor {NORM}: missing from the checkpoint"),
    "nan norm": (lambda c, p: resigned_copy(c, p / "ckpt", _set(NORM, float("nan"))),
                 rf"ckpt/model.safetensors: tensor {NORM}: contains NaN or Inf"),
    "inf alpha": (lambda c, p: resigned_copy(c, p / "ckpt", _set(
                      "model.layers.1.self_attn.o_proj.alpha", float("inf"))),
                  r"layer model.layers.1.self_attn.o_proj: tensor "
                  r"model.layers.1.self_attn.o_proj.alpha: contains NaN or Inf"),
    "embedding shape vs config": (
        lambda c, p: edit_config(_copy(c, p), quantization=False, vocab_size=400),
        r"tensor model.embed_tokens.weight: shape \[384, 96\] in the checkpoint, \[400, 96\]"),
    "avg_bits edited": (lambda c, p: edit_config(_copy(c, p), avg_bits=4.5),
                        r"ckpt/config.json: quantization_config.avg_bits=4.5, but the tensors "
                        r"give 3\.\d{6}"),
    "quantized_modules not a list": (
        lambda c, p: edit_config(_copy(c, p), quantized_modules="model.layers.0.mlp.up_proj"),
        r"quantization_config.quantized_modules='model.layers.0.mlp.up_proj': must be a list"),
}


def _copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "ckpt")


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_damaged_checkpoint_in_every_reader(llama_ckpt, tmp_path, capsys, text, case):
    make, want = CHECKPOINTS[case]
    make(llama_ckpt.path, tmp_path)
    ckpt = str(tmp_path / "ckpt")
    assert_match(run_cli(capsys, "eval", "ppl", ckpt, "--text", str(text)), want)
    assert_match(run_cli(capsys, "inspect", ckpt, "--verify"), want)
    for load in (load_sfmp_model, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(SFMPError) as e:
            load(ckpt)
        assert_match(str(e.value), want)


def test_plain_inspect_skips_only_the_checksums(llama_ckpt, tmp_path, capsys):
    _flip_qweight(_copy(llama_ckpt.path, tmp_path))
    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is False
    with pytest.raises(FormatError, match="checksum mismatch"):
        load_sfmp_model(tmp_path / "ckpt")
    load_sfmp_model(tmp_path / "ckpt", verify=False)  # what --no-verify accepts


@pytest.mark.parametrize("content,want", [
    (b"GGUF", r"truncated GGUF file \(4 bytes, shorter than the 24-byte header\)"),
    (None, r"cannot read this GGUF, truncated or damaged\? \(struct.error: "),
])
def test_damaged_gguf(tmp_path, capsys, content, want):
    from sfmp_serve.gguf_import import default_gguf_file
    if content is None:
        with open(default_gguf_file(), "rb") as f:
            content = f.read(3000)  # cut inside the metadata
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    assert_match(run_cli(capsys, "import-gguf", str(bad), "--out", str(tmp_path / "out")), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.mark.parametrize("kind", ["directory", "not safetensors"])
def test_unusable_salience_cache(tiny_llama, tmp_path, capsys, kind):
    cache = tmp_path / "fisher.safetensors"
    if kind == "directory":
        cache.mkdir()
        want = "is a directory"
    else:
        cache.write_text("not a salience file\n")
        want = r"not a salience file written by `sfmp quantize` \(.*\)"
    line = run_cli(capsys, "quantize", str(tiny_llama), "--bits", "3", "--salience-cache",
                   str(cache), "--out", str(tmp_path / "out"))
    assert_match(line, rf"--salience-cache {cache}: {want}")
