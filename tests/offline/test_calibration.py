"""Calibration sources: text files, hub datasets (mocked), and data-free sampling."""

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from offline.calibration import CalibrationSpec, calibration_tokens, text_calibration
from offline.model_io import load_model
from sfmp_serve.errors import SFMPError
from tests.tiny import CORPUS, make_tokenizer

TEXT = " ".join(CORPUS[:5])


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write(path, kind):
    if kind == "txt":
        path.write_text(TEXT)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                for i, t in enumerate(CORPUS[:5])))
    else:
        pq.write_table(pa.table({"text": CORPUS[:5]}), path)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_text_windows_are_seeded_slices_of_the_stream(tmp_path, tokenizer, kind):
    path = write(tmp_path / f"calib.{kind}", kind)
    spec = CalibrationSpec(str(path), nsamples=5, seqlen=16, seed=3)
    tokens = text_calibration(spec, tokenizer)
    assert tokens.shape == (5, 16) and tokens.dtype == torch.long
    assert torch.equal(tokens, text_calibration(spec, tokenizer))
    other = text_calibration(CalibrationSpec(str(path), 5, 16, seed=4), tokenizer)
    assert not torch.equal(tokens, other)
    stream = tokenizer("\n\n".join(CORPUS[:5]) if kind != "txt" else TEXT,
                       add_special_tokens=False)["input_ids"]
    windows = {tuple(stream[i:i + 16]) for i in range(len(stream) - 15)}
    assert all(tuple(row) in windows for row in tokens.tolist())


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ("", "empty"),
    ("   \n", "empty"),
    ("Paris.", "too short: .* tokens, need at least --seqlen=64"),
])
def test_bad_text_files(tmp_path, tokenizer, content, match):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SFMPError, match=match):
        text_calibration(CalibrationSpec(str(path), 2, 64), tokenizer)


def test_bad_jsonl_and_suffix(tmp_path, tokenizer):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SFMPError, match=r"c.jsonl:2: .*'text'"):
        text_calibration(CalibrationSpec(str(bad), 1, 4), tokenizer)
    other = tmp_path / "c.csv"
    other.write_text("a,b")
    with pytest.raises(SFMPError, match="unsupported calibration file type '.csv'"):
        text_calibration(CalibrationSpec(str(other), 1, 4), tokenizer)


def test_hub_dataset(monkeypatch, tokenizer):
    datasets = pytest.importorskip("datasets")  # optional: the 'hub' extra
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": CORPUS[:5]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tokens = text_calibration(CalibrationSpec("hf:wikitext:wikitext-2-raw-v1", 3, 16),
                              tokenizer)
    assert tokens.shape == (3, 16)
    text_calibration(CalibrationSpec("hf:wikitext::validation", 3, 16), tokenizer)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", None, "validation")]

    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(SFMPError, match="cannot load dataset .*ConnectionError"):
        text_calibration(CalibrationSpec("hf:wikitext", 3, 16), tokenizer)


def test_hub_dataset_without_the_package(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(SFMPError, match="'datasets' package is not installed"):
        text_calibration(CalibrationSpec("hf:wikitext", 3, 16), tokenizer)
    with pytest.raises(SFMPError, match="expected hf:NAME"):
        text_calibration(CalibrationSpec("hf:", 3, 16), tokenizer)


def test_spec_rejects_non_positive_sizes():
    with pytest.raises(SFMPError, match="--nsamples=0"):
        CalibrationSpec(None, 0, 16)
    with pytest.raises(SFMPError, match="--seqlen=-1"):
        CalibrationSpec(None, 2, -1)


def test_data_free_sampling_is_deterministic(tiny_llama):
    loaded = load_model(tiny_llama)
    spec = CalibrationSpec(None, nsamples=5, seqlen=12, seed=0, batch_size=2)
    tokens = calibration_tokens(spec, loaded.model, loaded.hf_config, lambda: None)
    assert tokens.shape == (5, 12)
    assert (tokens[:, 0] == loaded.hf_config["bos_token_id"]).all()
    banned = {loaded.hf_config["eos_token_id"], loaded.hf_config["pad_token_id"]}
    assert not set(tokens[:, 1:].flatten().tolist()) & banned
    again = calibration_tokens(spec, loaded.model, loaded.hf_config, lambda: None)
    assert torch.equal(tokens, again)
    other = CalibrationSpec(None, nsamples=5, seqlen=12, seed=1, batch_size=2)
    assert not torch.equal(tokens, calibration_tokens(other, loaded.model, loaded.hf_config,
                                                      lambda: None))
