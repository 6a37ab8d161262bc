"""Cost of checkpoint integrity checks: hash throughput, and verification at load in s per GB.

    .venv/bin/python bench/verify_cost.py --gb 1.0 [--out bench/results/verify_cost.json]

Writes a synthetic SFMP checkpoint of about --gb GB (a Llama-shaped model with 2048 hidden,
bf16, 3/4-bit blocks: random codes, valid structure) to a temporary directory, then measures,
best of --repeat, with the files in the page cache (read once before; a cold read adds the
disk's time to both sides alike):

- BLAKE3 (the format's checksum) and SHA-256 (the alternative) over 256 MB, one core;
- the checksums of every tensor at export (tensors in memory);
- load_checkpoint without checksums vs with: the verification cost, s per GB of tensors.
  safetensors maps the file, so the first pass over the bytes (the hash) also pays for mapping
  them from the page cache: the cost as a loader sees it;
- the `sfmp serve` pre-check (sfmp_serve.preflight) with and without --no-verify; the rest of
  the pre-check (building the meta model, structure and NaN checks) is the same in both.

One thread (torch and hashes): the numbers are per core; the 1-minute load average before and
after is recorded, as other work on the machine slows everything alike. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import blake3
import torch
from transformers import LlamaConfig

from sfmp_serve.arch import arch_for
from sfmp_serve.format import (LayerGeometry, PackedLinear, SFMPConfig, load_checkpoint,
                               write_checkpoint)
from sfmp_serve.preflight import check_checkpoint
from sfmp_serve.weights_file import tensor_digest

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
GROUP, BLOCK_ROWS = 128, 512


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _packed(out_f: int, in_f: int, gen: torch.Generator) -> PackedLinear:
    geo = LayerGeometry(out_f, in_f, GROUP, BLOCK_ROWS)
    bits = torch.randint(3, 5, (geo.n_block_rows, geo.n_groups), generator=gen,
                         dtype=torch.uint8)
    offsets, total = geo.offsets(bits)
    scale = lambda: (torch.rand(out_f, geo.n_groups, generator=gen) * 0.01).to(torch.bfloat16)
    return PackedLinear(
        torch.randint(-2**31, 2**31 - 1, (total,), generator=gen, dtype=torch.int32),
        scale(), scale(), bits, offsets.to(torch.int32),
        torch.randperm(in_f, generator=gen).to(torch.int32),
        torch.randperm(out_f, generator=gen).to(torch.int32))


def build(out: Path, gb: float) -> Path:
    """A synthetic checkpoint of about `gb` GB (layers added until it is reached)."""
    gen = torch.Generator().manual_seed(0)
    spec = arch_for("llama")
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "self_attn.k_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
              "self_attn.v_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
              "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen)
               .to(torch.bfloat16), "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    names: list[str] = []
    layers = 0
    while sum(t.numel() * t.element_size() for t in tensors.values()) < gb * 1e9:
        prefix = f"model.layers.{layers}"
        for rel in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{rel}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for rel in spec.linears:
            names.append(f"{prefix}.{rel}")
            tensors.update(_packed(*shapes[rel], gen).to_tensors(names[-1]))
        layers += 1
    hf = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                     num_hidden_layers=layers, num_attention_heads=HEADS,
                     num_key_value_heads=KV_HEADS, tie_word_embeddings=True).to_dict()
    config = SFMPConfig(group_size=GROUP, block_rows=BLOCK_ROWS, bit_choices=(3, 4),
                        avg_bits=0.0, bits_per_weight=0.0, act_dtype="bfloat16",
                        quantized_modules=tuple(names), input_groups=spec.input_groups)
    write_checkpoint(out, hf, config, tensors)
    return out


def measure(gb: float, repeat: int) -> dict:
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    sample = os.urandom(256 << 20)
    hashes = {name: sample.__len__() / 1e9 / _best(fn, repeat) for name, fn in (
        ("blake3", lambda: blake3.blake3(sample).digest()),
        ("sha256", lambda: hashlib.sha256(sample).digest()))}
    del sample
    with tempfile.TemporaryDirectory(prefix="sfmp-verify-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        start = time.perf_counter()
        build(ckpt, gb)
        export_s = time.perf_counter() - start
        loaded = load_checkpoint(ckpt, validate=False, verify=False)
        size_gb = sum(t.numel() * t.element_size() for t in loaded.tensors.values()) / 1e9
        # Resident copies, as the tensors are at export (loaded ones are mapped from the file).
        resident = {k: t.clone() for k, t in loaded.tensors.items()}
        digest_s = _best(lambda: [tensor_digest(k, t) for k, t in resident.items()], repeat)
        del loaded, resident
        read_s = _best(lambda: load_checkpoint(ckpt, validate=False, verify=False), repeat)
        verified_s = _best(lambda: load_checkpoint(ckpt, validate=False, verify=True), repeat)
        check = {verify: _best(lambda: check_checkpoint(ckpt, verify=verify), repeat)
                 for verify in (False, True)}
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}",
        "torch_threads": 1, "load_average_1min": [load_before, os.getloadavg()[0]],
        "checkpoint_gb": size_gb, "hash_gb_per_s": hashes,
        "export_s": export_s, "export_checksums_s": digest_s,
        "load_read_s": read_s, "load_verified_s": verified_s,
        "verify_s_per_gb": (verified_s - read_s) / size_gb,
        "digest_s_per_gb": digest_s / size_gb,
        "precheck_no_verify_s": check[False], "precheck_verify_s": check[True],
        "precheck_verify_s_per_gb": (check[True] - check[False]) / size_gb,
    }


def table(r: dict) -> str:
    gb = r["checkpoint_gb"]
    rows = [
        ("BLAKE3, 256 MB in memory (the format's checksum)",
         f"{r['hash_gb_per_s']['blake3']:.2f} GB/s", f"{1 / r['hash_gb_per_s']['blake3']:.3f}"),
        ("SHA-256, 256 MB in memory (for comparison)",
         f"{r['hash_gb_per_s']['sha256']:.2f} GB/s", f"{1 / r['hash_gb_per_s']['sha256']:.3f}"),
        (f"checksums of every tensor at export ({gb:.2f} GB)", f"{r['export_checksums_s']:.2f} s",
         f"{r['digest_s_per_gb']:.3f}"),
        ("load_checkpoint, checksums not compared", f"{r['load_read_s']:.2f} s",
         f"{r['load_read_s'] / gb:.3f}"),
        ("load_checkpoint, checksums verified", f"{r['load_verified_s']:.2f} s",
         f"{r['load_verified_s'] / gb:.3f}"),
        ("**verification at load** (difference)",
         f"{r['load_verified_s'] - r['load_read_s']:.2f} s", f"**{r['verify_s_per_gb']:.3f}**"),
        ("`sfmp serve` pre-check, `--no-verify`", f"{r['precheck_no_verify_s']:.2f} s",
         f"{r['precheck_no_verify_s'] / gb:.3f}"),
        ("`sfmp serve` pre-check, default (verified)", f"{r['precheck_verify_s']:.2f} s",
         f"{r['precheck_verify_s'] / gb:.3f}"),
        ("**what `--no-verify` saves** (difference)",
         f"{r['precheck_verify_s'] - r['precheck_no_verify_s']:.2f} s",
         f"**{r['precheck_verify_s_per_gb']:.3f}**"),
    ]
    lines = ["| what | time | s per GB |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size (default 1.0)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    if not (0 < args.gb < 64) or args.repeat < 1 or not math.isfinite(args.gb):
        parser.error("--gb must be in (0, 64) and --repeat at least 1")
    result = measure(args.gb, args.repeat)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
