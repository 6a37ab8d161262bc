"""Fuzz: random truncations, byte flips and header edits of a tiny checkpoint against
`sfmp inspect --verify`, `sfmp eval ppl` and the loader. Each must end in a clean refusal (exit
status 2 and one error line, or SFMPError) or, where the change is undetectable by design (say
a space of the header's padding turned into a tab), in exactly the unmodified checkpoint's
output. Fixed seed, bounded count."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
import torch

from sfmp_serve.cli.main import main
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import WEIGHTS_FILE
from sfmp_serve.hf import load_sfmp_model
from tests.corrupt import edit_config, edit_header, header
from tests.hf.checkpoints import make_sfmp_checkpoint
from tests.tiny import CORPUS, make_tiny_model

SEED = 17
TRUNCATIONS, FLIPS = 8, 30
IDS = torch.tensor([[0, 7, 51, 200, 13, 99, 5, 300]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_model(root / "model", "llama", layers=1, hidden=64, intermediate=96,
                            heads=2, kv_heads=1)
    ckpt = make_sfmp_checkpoint(model, root / "ckpt", seed=3).path
    text = root / "text.txt"
    text.write_text(" ".join(CORPUS[:3]))
    return ckpt, text


def _cli(capsys, argv: list[str]) -> str | None:
    """stdout of a command that succeeded, None for a clean refusal; anything else fails."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if rc == 2:
        lines = captured.err.strip().splitlines()
        assert lines[-1].startswith(f"sfmp {argv[0]}: error: ")
        assert captured.err.count(f"sfmp {argv[0]}: error:") == 1
        return None
    assert rc == 0, captured.err
    return captured.out


def outputs(ckpt, text, capsys) -> tuple:
    """(inspect, eval, loader) results, each None when the consumer refused the checkpoint."""
    inspected = _cli(capsys, ["inspect", str(ckpt), "--verify", "--json"])
    if inspected is not None:
        inspected = {k: v for k, v in json.loads(inspected).items() if k != "path"}
    evaluated = _cli(capsys, ["eval", "ppl", str(ckpt), "--text", str(text), "--seqlen", "32",
                              "--max-tokens", "48", "--json"])
    try:
        with torch.no_grad():
            logits = load_sfmp_model(ckpt)(IDS).logits
    except SFMPError as e:
        assert "\n" not in str(e)
        logits = None
    return inspected, evaluated, logits


def _header_edits(rng: random.Random, head: dict) -> list:
    names = sorted(k for k in head if k != "__metadata__")
    by_size = {}
    for k in names:
        by_size.setdefault((head[k]["data_offsets"][1] - head[k]["data_offsets"][0]), []).append(k)
    pairs = [v for v in by_size.values() if len(v) > 1]
    same_size = {"F32": "I32", "I32": "F32", "U8": "I8", "BF16": "F16"}
    two_d = [k for k in names if len(head[k]["shape"]) == 2 and
             head[k]["shape"][0] != head[k]["shape"][1]]

    def dtype(h):
        k = rng.choice(names)
        h[k]["dtype"] = same_size.get(h[k]["dtype"], "F16")

    def transpose(h):
        k = rng.choice(two_d)
        h[k]["shape"] = h[k]["shape"][::-1]

    def swap(h):
        a, b = rng.sample(rng.choice(pairs), 2)
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]

    def rename(h):
        k = rng.choice(names)
        h[k + "_renamed"] = h.pop(k)

    def drop(h):
        h.pop(rng.choice(names))

    def strip_metadata(h):
        h.pop("__metadata__")

    def digest(h):
        digests = json.loads(h["__metadata__"]["sfmp_checksums"])
        k = rng.choice(names)
        digests[k] = digests[k][:-1] + ("0" if digests[k][-1] != "0" else "1")
        h["__metadata__"]["sfmp_checksums"] = json.dumps(digests)

    def algorithm(h):
        h["__metadata__"]["sfmp_checksum"] = "sha256"

    return [dtype, dtype, transpose, swap, rename, drop, strip_metadata, digest, algorithm]


# (changes, of quantization_config or of the top level, whether every consumer must refuse)
CONFIG_EDITS = [({"avg_bits": 2.0}, True, True), ({"bits_per_weight": 9.5}, True, True),
                ({"group_size": 64}, True, True), ({"block_rows": 8}, True, True),
                ({"bit_choices": [2, 3]}, True, True), ({"quantized_modules": []}, True, True),
                ({"act_dtype": "bfloat16"}, True, True),
                # a version 1 reader expects int32 permutations: the 16-bit ones are named
                ({"format_version": 1}, True, True),
                ({"_name_or_path": "elsewhere"}, False, False)]  # harmless: nothing reads it


def mutations(ckpt, rng: random.Random) -> list[tuple[str, callable, bool]]:
    """(what, mutate(weights file), whether every consumer must refuse it)."""
    weights = ckpt / WEIGHTS_FILE
    size = weights.stat().st_size
    _, data_start = header(weights)
    out = []
    for _ in range(TRUNCATIONS):
        cut = rng.randrange(size)
        out.append((f"truncate to {cut}", lambda p, cut=cut: p.write_bytes(p.read_bytes()[:cut]),
                    True))
    for i in range(FLIPS):
        # half in the header (length, JSON, padding), half in the tensor data
        offset = rng.randrange(data_start) if i % 2 else rng.randrange(data_start, size)
        mask = rng.randrange(1, 256)

        def flip(p, offset=offset, mask=mask):
            data = bytearray(p.read_bytes())
            data[offset] ^= mask
            p.write_bytes(bytes(data))
        out.append((f"flip byte {offset} ^ {mask:#04x}", flip, offset >= data_start))
    for edit in _header_edits(rng, header(weights)[0]):
        out.append((f"header: {edit.__name__}", lambda p, edit=edit: edit_header(p, edit), True))
    for changes, quantization, must_refuse in CONFIG_EDITS:
        out.append((f"config: {changes}",
                    lambda p, c=changes, q=quantization: edit_config(p.parent, q, **c),
                    must_refuse))
    return out


@pytest.mark.timeout(300)
def test_fuzzed_checkpoints_are_refused_or_harmless(tiny, tmp_path, capsys):
    ckpt, text = tiny
    start = time.monotonic()
    baseline = outputs(ckpt, text, capsys)
    assert all(o is not None for o in baseline)
    refused = accepted = 0
    for n, (what, mutate, must_refuse) in enumerate(mutations(ckpt, random.Random(SEED))):
        copy = shutil.copytree(ckpt, tmp_path / f"m{n}")
        mutate(copy / WEIGHTS_FILE)
        got = outputs(copy, text, capsys)
        for name, want, have in zip(("inspect", "eval", "loader"), baseline, got):
            if have is None:
                refused += 1
                continue
            assert not must_refuse, f"{what}: {name} accepted it"
            accepted += 1
            if isinstance(want, torch.Tensor):
                assert torch.equal(have, want), f"{what}: {name} computed something else"
            else:
                assert have == want, f"{what}: {name} gave {have!r}"
        shutil.rmtree(copy)
    assert refused >= 3 * (TRUNCATIONS + FLIPS // 2) and accepted >= 3  # both kinds were seen
    assert time.monotonic() - start < 240
