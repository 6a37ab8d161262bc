"""SFMP format: round trip, and every mismatch between tensors and config names the tensor.

Checksums, version 1 and the bit statistics are in test_integrity.py.
"""

import json
import os
import stat
from dataclasses import replace

import pytest
import torch

from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import (FORMAT_VERSION, BitStats, LayerGeometry, SFMPConfig,
                               load_checkpoint, write_checkpoint)
from tests.corrupt import edit_config, resigned_copy
from tests.offline.helpers import make_config, random_packed

NAME = "model.layers.0.mlp.down_proj"


@pytest.fixture
def checkpoint(tmp_path):
    """(config, packed, write(tensors, cfg) -> path) for one linear called NAME."""
    config = make_config(modules=(NAME,))
    packed, _ = random_packed(37, 45, config, seed=2, bias=True)

    def write(tensors=None, cfg=config, out="ckpt"):
        tensors = packed.to_tensors(NAME) if tensors is None else tensors
        tensors = {**tensors, "model.norm.weight": torch.ones(45)}
        return write_checkpoint(tmp_path / out, {"model_type": "llama"}, cfg, tensors)

    return config, packed, write


def test_round_trip(checkpoint):
    config, packed, write = checkpoint
    ckpt = load_checkpoint(write())
    stats = BitStats.of([packed], config)
    # the bit statistics are recorded as the tensors give them, not as the caller said
    assert (config.avg_bits, config.bits_per_weight) == (4.0, 5.0)
    assert ckpt.config == replace(config, avg_bits=round(stats.avg_bits, 6),
                                  bits_per_weight=round(stats.bits_per_weight, 6))
    assert ckpt.config.format_version == FORMAT_VERSION == 4
    assert ckpt.hf_config["model_type"] == "llama"
    loaded = ckpt.packed(NAME)
    for key, tensor in packed.to_tensors(NAME).items():
        assert torch.equal(ckpt.tensors[key], tensor), key
    loaded.validate(NAME, config, (37, 45))
    assert SFMPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def corrupt(packed, name, suffix, value):
    tensors = packed.to_tensors(name)
    tensors[f"{name}.{suffix}"] = value
    return tensors


@pytest.mark.parametrize("suffix,make,why", [
    ("alpha", lambda p: p.alpha[:, :-1].contiguous(), "shape"),
    ("qweight", lambda p: p.qweight[:-1].clone(), "words"),
    ("block_offsets", lambda p: p.block_offsets.flip(0).contiguous(), "inconsistent"),
    ("input_perm", lambda p: torch.zeros_like(p.input_perm), "not a permutation"),
    ("output_perm", lambda p: p.output_perm.to(torch.int64), "dtype"),
    ("beta", lambda p: torch.full_like(p.beta, float("nan")), "NaN"),
    ("bias", lambda p: p.bias.index_fill(0, torch.tensor([3]), float("inf")), "NaN or Inf"),
])
def test_mismatched_tensor_is_named(checkpoint, tmp_path, suffix, make, why):
    config, packed, write = checkpoint
    bad = corrupt(packed, NAME, suffix, make(packed))
    with pytest.raises(FormatError, match=why):  # never written ...
        write(bad, out="refused")
    assert not (tmp_path / "refused").exists()
    path = resigned_copy(write(), tmp_path / "bad",  # ... and refused when read
                         lambda t: t.update({f"{NAME}.{suffix}": bad[f"{NAME}.{suffix}"]}))
    with pytest.raises(FormatError, match=why) as e:
        load_checkpoint(path)
    assert f"{NAME}.{suffix}" in str(e.value) and "\n" not in str(e.value)


def test_bits_outside_choices_and_missing_tensor(checkpoint, tmp_path):
    config, packed, write = checkpoint
    path = write(out="a")
    edit_config(path, bit_choices=[1, 2])
    with pytest.raises(FormatError, match=f"{NAME}.block_bits.*not in bit_choices"):
        load_checkpoint(path)
    path = resigned_copy(write(out="b"), tmp_path / "c", lambda t: t.pop(f"{NAME}.alpha"))
    with pytest.raises(FormatError, match=f"{NAME}.alpha"):
        load_checkpoint(path)


def test_shape_against_the_model(checkpoint):
    config, packed, _ = checkpoint
    with pytest.raises(FormatError, match="in the model"):
        packed.validate(NAME, config, (45, 37))


@pytest.mark.parametrize("changes,match", [
    ({"format_version": 5}, "format_version=5.*unknown format version"),
    ({"group_sise": 16}, "unknown key"),
    ({"group_size": 12}, "multiple of 8"),
    ({"act_dtype": "float8"}, "act_dtype"),
])
def test_bad_quantization_config(checkpoint, changes, match):
    _, _, write = checkpoint
    path = write()
    edit_config(path, **changes)
    with pytest.raises(FormatError, match=match):
        load_checkpoint(path)


def test_orphan_tensor_and_not_sfmp(checkpoint, tmp_path):
    config, packed, write = checkpoint
    others = {k: v.clone() for k, v in packed.to_tensors("other").items()}
    with pytest.raises(FormatError, match="other.qweight"):
        load_checkpoint(resigned_copy(write(), tmp_path / "bad", lambda t: t.update(others)))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SFMPError, match="not an SFMP checkpoint"):
        load_checkpoint(tmp_path / "plain")


def test_write_is_atomic_and_refuses_to_overwrite(checkpoint, tmp_path):
    config, packed, write = checkpoint
    path = write()
    with pytest.raises(SFMPError, match="exists"):
        write()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SFMPError, match="new: cannot write.*missing.json"):
        write_checkpoint(tmp_path / "new", {}, config, packed.to_tensors(NAME),
                         copy_files=[tmp_path / "missing.json"])  # fails mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp dir
    assert load_checkpoint(path).config.quantized_modules == (NAME,)


def test_written_checkpoint_is_readable_by_others(checkpoint):
    """The temporary directory is private (0700); the finished checkpoint must not be, or a
    server running as another user or in a container cannot read it."""
    old = os.umask(0o022)
    try:
        path = checkpoint[2]()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}


def test_geometry_ragged_edges():
    geo = LayerGeometry(out_features=37, in_features=45, group_size=16, block_rows=8)
    assert geo.rows().tolist() == [8, 8, 8, 8, 5]
    assert geo.cols().tolist() == [16, 16, 13]
    assert geo.words().tolist() == [1, 1, 1]
    bits = torch.full((5, 3), 3, dtype=torch.uint8)
    offsets, total = geo.offsets(bits)
    assert total == 3 * 37 * 3 and offsets[1, 0] == 3 * 8 * 3
