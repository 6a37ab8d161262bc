"""Decode speed of a plain-torch Llama decoder at Llama-3.1-8B shapes: SFMP linears vs fp16/bf16.

Random weights (speed does not depend on them), 32 layers, fused qkv (6144 x 4096) and gate_up
(28672 x 4096), o and down; embeddings and lm_head stay dense, as in SFMP checkpoints. Every
decoder linear is either a dense matmul or an SFMP linear (bench/gpu_common.py: bits allocated
by the pipeline's allocator over all blocks of the model). One decode step (B tokens, static KV
cache, position advanced on the device) is captured in a CUDA graph and replayed; tokens/s =
B / median step time. SFMP linears run one kernel family (--kernels): "lut" (the default
backend) or "mma" (the tensor-core kernels). The same step with every decoder linear replaced
by a view of a zero buffer (no GPU work) gives the time of everything else (attention, norms,
RoPE, embeddings, lm_head, launches); the linears' share is the difference.

    python bench/decode.py [--kernels lut,mma] [--dtypes float16,bfloat16] [--bpw 3.5]
                           [--batch 1,8,16] [--layers 32] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from gpu_common import (BLOCK_ROWS, GROUP_SIZE, allocate_bits, random_mma, random_packed,
                        sfmp_config)
from sfmp_serve.format import LayerGeometry
from sfmp_serve.ops.cuda import cuda_linear, mma_linear
from sfmp_serve.ops.cuda.repack import repack
from sfmp_serve.ops.cuda.runtime import runner_for

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256
MAX_LEN, START_POS, REPLAYS = 512, 64, 100
LINEARS = {"qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "o": (HIDDEN, HIDDEN),
           "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}  # name -> (out, in)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Model:
    embed: torch.Tensor
    lm_head: torch.Tensor
    linears: list[dict[str, Linear]]
    weight_bytes: int  # of the decoder linears
    cos: torch.Tensor
    sin: torch.Tensor


def _rope_tables(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM))
    angles = torch.arange(MAX_LEN, device="cuda")[:, None] * inv[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def dense_linears(layers: int, dtype: torch.dtype) -> tuple[list[dict[str, Linear]], int]:
    out, nbytes = [], 0
    for _ in range(layers):
        ws = {name: torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
              for name, (n, k) in LINEARS.items()}
        nbytes += sum(w.numel() * w.element_size() for w in ws.values())
        out.append({name: (lambda x, w=w: x @ w.t()) for name, w in ws.items()})
    return out, nbytes


def null_linears(layers: int, dtype: torch.dtype,
                 max_batch: int) -> tuple[list[dict[str, Linear]], int]:
    """Linears that cost nothing on the GPU: views of one zero buffer of the output's shape."""
    zeros = torch.zeros(max_batch, max(n for n, _ in LINEARS.values()), device="cuda",
                        dtype=dtype)
    return [{name: (lambda x, n=n: zeros[: x.shape[0], :n]) for name, (n, _) in LINEARS.items()}
            for _ in range(layers)], 0


def sfmp_linears(layers: int, dtype: torch.dtype, bpw: float,
                 family: str = "lut") -> tuple[list[dict[str, Linear]], int]:
    geos = {f"{i}.{name}": LayerGeometry(n, k, GROUP_SIZE, BLOCK_ROWS)
            for i in range(layers) for name, (n, k) in LINEARS.items()}
    bits, choices = allocate_bits(geos, bpw)
    config = sfmp_config(choices, dtype)
    out, nbytes = [], 0
    for i in range(layers):
        linears = {}
        for j, name in enumerate(LINEARS):
            key, seed = f"{i}.{name}", i * len(LINEARS) + j
            if family == "mma":
                state = random_mma(geos[key], bits[key], dtype, "cuda", seed=seed)
                linears[name] = lambda x, s=state: mma_linear(x, s)
            else:
                state = repack(random_packed(geos[key], bits[key], dtype, "cuda", seed=seed),
                               config)
                linears[name] = lambda x, s=state: cuda_linear(x, s)
            nbytes += state.nbytes
        out.append(linears)
    return out, nbytes


def build_model(layers: int, dtype: torch.dtype, bpw: float | None, family: str = "lut",
                max_batch: int = 16) -> Model:
    """family "dense", "lut", "mma" or "null" (the linears cost nothing)."""
    if family == "dense":
        linears, nbytes = dense_linears(layers, dtype)
    elif family == "null":
        linears, nbytes = null_linears(layers, dtype, max_batch)
    else:
        linears, nbytes = sfmp_linears(layers, dtype, bpw, family)
    cos, sin = _rope_tables(dtype)
    return Model(embed=torch.randn(VOCAB, HIDDEN, device="cuda", dtype=dtype) * 0.02,
                 lm_head=torch.randn(VOCAB, HIDDEN, device="cuda", dtype=dtype) * 0.02,
                 linears=linears, weight_bytes=nbytes, cos=cos, sin=sin)


def _rms(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def decode_step(model: Model, cache: list[tuple[torch.Tensor, torch.Tensor]],
                tokens: torch.Tensor, pos: torch.Tensor) -> None:
    """One token per sequence; updates tokens (greedy) and pos in place (graph-safe)."""
    b = tokens.shape[0]
    h = model.embed[tokens]
    cos, sin = model.cos[pos][:, None, :], model.sin[pos][:, None, :]  # [1, 1, D/2]
    mask = (torch.arange(MAX_LEN, device="cuda") <= pos).view(1, 1, 1, MAX_LEN)
    for linears, (k_cache, v_cache) in zip(model.linears, cache):
        qkv = linears["qkv"](_rms(h))
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        q = _rope(q.view(b, HEADS, HEAD_DIM), cos, sin)
        k = _rope(k.view(b, KV_HEADS, HEAD_DIM), cos, sin)
        k_cache.index_copy_(2, pos, k[:, :, None, :])
        v_cache.index_copy_(2, pos, v.view(b, KV_HEADS, 1, HEAD_DIM))
        attn = F.scaled_dot_product_attention(q[:, :, None, :], k_cache, v_cache,
                                              attn_mask=mask, enable_gqa=True)
        h = h + linears["o"](attn.reshape(b, HEADS * HEAD_DIM))
        gate, up = linears["gate_up"](_rms(h)).chunk(2, dim=-1)
        h = h + linears["down"](F.silu(gate) * up)
    logits = _rms(h) @ model.lm_head.t()
    tokens.copy_(logits.argmax(-1))
    pos.add_(1)


def time_decode(model: Model, batch: int, dtype: torch.dtype) -> float:
    """Median milliseconds per decode step, replaying a CUDA graph of one step."""
    cache = [(torch.zeros(batch, KV_HEADS, MAX_LEN, HEAD_DIM, device="cuda", dtype=dtype),
              torch.zeros(batch, KV_HEADS, MAX_LEN, HEAD_DIM, device="cuda", dtype=dtype))
             for _ in model.linears]
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    pos = torch.tensor([START_POS], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step(model, cache, tokens, pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step(model, cache, tokens, pos)
    times = []
    for _ in range(REPLAYS):
        if int(pos) >= MAX_LEN - 1:  # stay inside the cache
            pos.fill_(START_POS)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="lut,mma",
                        type=lambda s: [f for f in s.split(",") if f])
    parser.add_argument("--dtypes", default="float16,bfloat16",
                        type=lambda s: [d for d in s.split(",") if d])
    parser.add_argument("--bpw", default="3.5", type=lambda s: [float(v) for v in s.split(",")])
    parser.add_argument("--batch", default="1,8,16",
                        type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if any(d not in DTYPES for d in args.dtypes):
        print(f"error: --dtypes {args.dtypes}: expected float16 and/or bfloat16", file=sys.stderr)
        return 2
    if any(f not in ("lut", "mma") for f in args.kernels):
        print(f"error: --kernels {args.kernels}: expected lut and/or mma", file=sys.stderr)
        return 2
    runner = runner_for("cuda")
    if "mma" in args.kernels:
        runner.load_mma()
    print(f"{torch.cuda.get_device_name()}, {args.layers} layers at Llama-3.1-8B shapes\n")
    print("| dtype | linears | linear GB | batch | step ms | tokens/s | vs dense | linears ms "
          "| rest ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    max_batch = max(args.batch)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        model = build_model(args.layers, dtype, None, "null", max_batch)
        rest_ms = {batch: time_decode(model, batch, dtype) for batch in args.batch}
        del model
        dense_ms = {}
        runs = [("dense", None)] + [(f, bpw) for bpw in args.bpw for f in args.kernels]
        for family, bpw in runs:
            model = build_model(args.layers, dtype, bpw, family, max_batch)
            for batch in args.batch:
                ms = time_decode(model, batch, dtype)
                dense_ms.setdefault(batch, ms)
                row = dict(dtype=dtype_name, kernels=family, bpw=bpw, batch=batch, step_ms=ms,
                           tokens_per_s=batch / ms * 1e3, speedup=dense_ms[batch] / ms,
                           linear_gb=model.weight_bytes / 1e9, rest_ms=rest_ms[batch],
                           linears_ms=ms - rest_ms[batch])
                rows.append(row)
                label = "dense" if bpw is None else f"SFMP {family} {bpw} BPW"
                print(f"| {dtype_name} | {label} | {row['linear_gb']:.2f} | {batch} | {ms:.2f} | "
                      f"{row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
                      f"{row['linears_ms']:.2f} | {row['rest_ms']:.2f} |", flush=True)
                if args.json:  # after every row: a capped run keeps what it measured
                    args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                         rows=rows), indent=1))
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
