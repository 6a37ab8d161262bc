"""Hugging Face-style shards: the size cap, the index, its checks, and weights files whose bytes
depend only on their tensors (safetensors' own writer orders its header per process)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import load_checkpoint, write_checkpoint
from sfmp_serve.shards import INDEX_FILE, parse_size, split_units
from sfmp_serve.weights_file import tensor_refs, write_weights
from tests.offline.helpers import make_config, random_packed

NAMES = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


def tensors():
    config = make_config(modules=tuple(NAMES))
    out = {"model.embed_tokens.weight": torch.randn(50, 45, generator=torch.Generator()
                                                    .manual_seed(0)).to(torch.bfloat16),
           "model.norm.weight": torch.linspace(0.5, 1.5, 45)}
    for i, name in enumerate(NAMES):
        out.update(random_packed(37, 45, config, seed=i)[0].to_tensors(name))
    return config, out


def test_size_parsing_and_greedy_split():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500 mb") == 500 * 10**6 and parse_size(1234) == 1234
    for bad in ("five", "5XB", "0", "-1GB"):
        with pytest.raises(SFMPError, match="--max-shard-size"):
            parse_size(bad)
    units = [("a", 4), ("b", 4), ("c", 9), ("d", 1), ("e", 1)]
    assert split_units(units, 10) == [["a", "b"], ["c", "d"], ["e"]]  # c alone exceeds no cap
    assert split_units(units, 3) == [["a"], ["b"], ["c"], ["d", "e"]]


def test_sharded_checkpoint_has_an_index_and_loads(tmp_path):
    config, t = tensors()
    out = write_checkpoint(tmp_path / "ckpt", {"model_type": "llama"}, config, t,
                           max_shard_size=2000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(t) and set(index["weight_map"].values()) == set(
        shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size()
                                                  for v in t.values())
    ckpt = load_checkpoint(out)
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in t.items())
    assert all(ckpt.files[k].name == f for k, f in index["weight_map"].items())
    single = write_checkpoint(tmp_path / "one", {"model_type": "llama"}, config, t)
    assert [p.name for p in single.glob("*.safetensors*")] == ["model.safetensors"]


def test_index_that_disagrees_with_the_files_is_refused(tmp_path):
    config, t = tensors()
    out = write_checkpoint(tmp_path / "ckpt", {"model_type": "llama"}, config, t,
                           max_shard_size=2000)
    index = json.loads((out / INDEX_FILE).read_text())
    files = list(index["weight_map"].values())
    key = next(k for k, f in index["weight_map"].items() if files.count(f) > 1)
    other = next(f for f in files if f != index["weight_map"][key])
    moved = dict(index, weight_map={**index["weight_map"], key: other})
    (out / INDEX_FILE).write_text(json.dumps(moved))
    with pytest.raises(FormatError, match=rf"tensor {key}: listed in {other}, stored in "):
        load_checkpoint(out)
    (out / INDEX_FILE).write_text(json.dumps(index))
    write_weights(out / "extra.safetensors", {"x": torch.zeros(1)}, {})
    with pytest.raises(FormatError, match="extra.safetensors: not listed in "
                                          "model.safetensors.index.json"):
        load_checkpoint(out, verify=False)


WRITE = """
import sys, torch
from sfmp_serve.weights_file import write_weights
t = {f"t{i}": torch.arange(i * 7, dtype=torch.float32).reshape(i, 7) for i in range(1, 9)}
t["u"] = torch.arange(5, dtype=torch.uint8)
write_weights(sys.argv[1], t, {"format": "pt", "zeta": "1", "alpha": "2"})
"""


def test_same_tensors_give_the_same_bytes_in_every_process(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", WRITE, str(tmp_path / name)], check=True)
    data = (tmp_path / "a").read_bytes()
    assert data == (tmp_path / "b").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(
        header["__metadata__"])
    # a standard safetensors file: offsets contiguous, data 8-aligned, readers agree
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0
    loaded = load_file(tmp_path / "a")
    assert torch.equal(loaded["t3"], torch.arange(21, dtype=torch.float32).reshape(3, 7))
    with safe_open(tmp_path / "a", framework="pt") as f:
        assert f.metadata()["zeta"] == "1" and "sfmp_checksums" in f.metadata()
    refs, digests = tensor_refs(tmp_path / "a")
    assert set(refs) == set(loaded) and set(digests) == set(loaded)
