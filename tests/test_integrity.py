"""Format integrity (versions 2 and 3): checksums of every tensor, version 1 still read, the bit
statistics recomputed, NaN/Inf and JSON types refused, each error naming file, tensor or key."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sfmp_serve.errors import FormatError
from sfmp_serve.format import (WEIGHTS_FILE, PackedLinear, load_checkpoint, perm_dtype,
                               write_checkpoint)
from sfmp_serve.weights_file import tensor_digest, write_weights
from tests.corrupt import data_offset, edit_config, edit_header, flip_byte, resigned_copy
from tests.offline.helpers import make_config, random_packed

NAME = "model.layers.0.mlp.down_proj"
NORM = "model.norm.weight"


@pytest.fixture
def ckpt(tmp_path):
    config = make_config(modules=(NAME,))
    packed, _ = random_packed(37, 45, config, seed=3)
    tensors = {**packed.to_tensors(NAME), NORM: torch.linspace(0.5, 1.5, 45),
               "model.embed_tokens.weight": torch.randn(11, 45).to(torch.bfloat16)}
    return write_checkpoint(tmp_path / "ckpt", {"model_type": "llama"}, config, tensors)


def test_every_tensor_has_its_digest_in_the_header(ckpt):
    with safe_open(ckpt / WEIGHTS_FILE, framework="pt") as f:
        meta = f.metadata()
        digests = json.loads(meta["sfmp_checksums"])
        assert meta["sfmp_checksum"] == "blake3" and meta["sfmp_format_version"] == "4"
        assert set(digests) == set(f.keys())
        for key in f.keys():
            assert digests[key] == tensor_digest(key, f.get_tensor(key))
    t = torch.arange(6, dtype=torch.int32)
    # name, dtype and shape are part of the digest, not only the bytes
    assert len({tensor_digest("a", t), tensor_digest("b", t),
                tensor_digest("a", t.view(torch.float32)), tensor_digest("a", t.view(2, 3))}) == 4


@pytest.mark.parametrize("tensor", [f"{NAME}.qweight", f"{NAME}.alpha", f"{NAME}.output_perm",
                                    NORM])
def test_flipped_data_byte_names_file_and_tensor(ckpt, tensor):
    flip_byte(ckpt / WEIGHTS_FILE, data_offset(ckpt / WEIGHTS_FILE, tensor) + 2, 0x01)
    with pytest.raises(FormatError) as e:
        load_checkpoint(ckpt)
    assert str(e.value) == (f"{ckpt / WEIGHTS_FILE}: tensor {tensor}: checksum mismatch (its "
                            "data or its header entry changed after export)")


def test_a_flip_only_verification_sees_loads_without_it(ckpt):
    """A code bit of qweight is a valid code: without checksums nothing could notice."""
    flip_byte(ckpt / WEIGHTS_FILE, data_offset(ckpt / WEIGHTS_FILE, f"{NAME}.qweight"), 0x01)
    assert load_checkpoint(ckpt, verify=False).config.quantized_modules == (NAME,)


def _set_dtype(name, dtype):
    return lambda head: head[name].update(dtype=dtype)


def _swap(field, a, b):
    def edit(head):
        head[a][field], head[b][field] = head[b][field], head[a][field]
    return edit


@pytest.mark.parametrize("edit,tensor", [
    (_set_dtype("model.embed_tokens.weight", "F16"), "model.embed_tokens.weight"),  # bf16->f16
    (_set_dtype(NORM, "I32"), NORM),
    (lambda head: head[f"{NAME}.alpha"].update(shape=head[f"{NAME}.alpha"]["shape"][::-1]),
     f"{NAME}.alpha"),
    (_swap("data_offsets", f"{NAME}.alpha", f"{NAME}.beta"), f"{NAME}.alpha"),
])
def test_header_edits_that_keep_the_size_are_caught(ckpt, edit, tensor):
    edit_header(ckpt / WEIGHTS_FILE, edit)
    with pytest.raises(FormatError, match=rf"model.safetensors: tensor {tensor}: checksum "):
        load_checkpoint(ckpt)


def test_tensors_added_or_removed_after_export(ckpt, tmp_path):
    tensors = load_file(ckpt / WEIGHTS_FILE)
    with safe_open(ckpt / WEIGHTS_FILE, framework="pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in tensors.items() if k != NORM}, ckpt / WEIGHTS_FILE, meta)
    with pytest.raises(FormatError, match=f"tensor {NORM}: recorded at export but missing"):
        load_checkpoint(ckpt, verify=False)
    save_file({**tensors, "extra": torch.zeros(2)}, ckpt / WEIGHTS_FILE, meta)
    with pytest.raises(FormatError, match="tensor extra: no checksum recorded at export"):
        load_checkpoint(ckpt)
    save_file(tensors, ckpt / WEIGHTS_FILE, {"format": "pt"})  # rewritten by another tool
    with pytest.raises(FormatError, match="no 'sfmp_checksums' in the safetensors header"):
        load_checkpoint(ckpt)


def as_old_version(ckpt, version):
    """Rewrite a current checkpoint as format `version` < 3 wrote it: int32 permutations and
    the bits per weight they give."""
    tensors = load_file(ckpt / WEIGHTS_FILE)
    for key in (f"{NAME}.input_perm", f"{NAME}.output_perm"):
        tensors[key] = tensors[key].to(torch.int32)
    packed = PackedLinear.from_tensors(NAME, tensors)
    return tensors, round(packed.stored_bits(version) / (37 * 45), 6)


def test_version_3_stores_16_bit_permutations(ckpt):
    tensors = load_file(ckpt / WEIGHTS_FILE)
    assert tensors[f"{NAME}.input_perm"].dtype == torch.uint16
    loaded = load_checkpoint(ckpt)
    packed = loaded.packed(NAME)
    assert packed.input_perm.dtype == packed.output_perm.dtype == torch.int32  # in memory
    _, old_bpw = as_old_version(ckpt, 2)
    # 16 bits saved per permutation entry, counted in the statistics
    assert old_bpw - loaded.config.bits_per_weight == pytest.approx(16 * (37 + 45) / (37 * 45),
                                                                     abs=2e-6)
    assert perm_dtype(1 << 16) == torch.uint16 and perm_dtype((1 << 16) + 1) == torch.int32
    assert perm_dtype(100, version=2) == torch.int32


def test_version_2_int32_permutations_still_load(ckpt):
    tensors, bpw = as_old_version(ckpt, 2)
    with safe_open(ckpt / WEIGHTS_FILE, framework="pt") as f:
        meta = f.metadata()
    write_weights(ckpt / WEIGHTS_FILE, tensors, {**meta, "sfmp_format_version": "2"})
    edit_config(ckpt, format_version=2, bits_per_weight=bpw)
    loaded = load_checkpoint(ckpt)
    assert loaded.config.format_version == 2
    assert torch.equal(loaded.packed(NAME).input_perm, tensors[f"{NAME}.input_perm"])
    # a version 3 file must hold the narrow type: a wide one is a writer's bug, named
    edit_config(ckpt, format_version=3)
    with pytest.raises(FormatError, match=rf"tensor {NAME}\.input_perm: dtype torch.int32, "
                                          r"format version 3 stores it as torch.uint16"):
        load_checkpoint(ckpt)


def test_version_1_without_checksums_loads_with_a_warning(ckpt, caplog):
    tensors, bpw = as_old_version(ckpt, 1)
    save_file(tensors, ckpt / WEIGHTS_FILE, {"format": "pt"})
    edit_config(ckpt, format_version=1, bits_per_weight=bpw)
    with caplog.at_level(logging.WARNING, logger="sfmp_serve.format"):
        loaded = load_checkpoint(ckpt)
    assert loaded.config.format_version == 1
    assert "format version 1 records no checksums (model.safetensors)" in caplog.text


@pytest.mark.parametrize("key,value,want", [
    ("avg_bits", 2.5, "the tensors give"),
    ("bits_per_weight", 30.0, "the tensors give"),
    ("avg_bits", float("nan"), "the tensors give"),
    ("quantized_modules", 5, "must be a list of module names"),
    ("quantized_modules", NAME, "must be a list of module names"),  # not its characters
    ("quantized_modules", [NAME, NAME], "listed more than once"),
    ("input_groups", ["mlp.up_proj"], "must be a list of lists of module names"),
    ("bit_choices", "234", "must be a list of integers"),
    ("group_size", 16.0, "must be an integer"),
    ("group_size", True, "must be an integer"),
    ("avg_bits", "3.1", "must be a number"),
    ("method_args", [], "must be a JSON object"),
])
def test_config_edits_are_named(ckpt, key, value, want):
    edit_config(ckpt, **{key: value})
    with pytest.raises(FormatError, match=rf"quantization_config\.{key}=.*{want}") as e:
        load_checkpoint(ckpt)
    assert "\n" not in str(e.value)


def test_quantization_config_not_an_object(ckpt):
    edit_config(ckpt, quantization=False, quantization_config=["sfmp"])
    with pytest.raises(FormatError, match="quantization_config must be a JSON object"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_unquantized_tensor_names_file_and_tensor(ckpt, tmp_path, value):
    bad = resigned_copy(ckpt, tmp_path / "bad", lambda t: t[NORM].__setitem__(7, value))
    with pytest.raises(FormatError, match=rf"bad/model.safetensors: tensor {NORM}: contains "
                                          "NaN or Inf"):
        load_checkpoint(bad)


def test_finite_check_looks_at_every_chunk():
    from sfmp_serve.format import all_finite
    t = torch.zeros(10, 7)
    assert all_finite(t, chunk=8)
    t[9, 6] = float("inf")  # in the last, partial chunk
    assert not all_finite(t, chunk=8) and not all_finite(t.to(torch.bfloat16), chunk=64)
