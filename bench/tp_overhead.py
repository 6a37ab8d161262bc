"""What tensor-parallel ranges cost a single-rank server: the SFMP op over every decoder linear of
two checkpoints of one model, one without ranges (--tp-shards 1) and one with (e.g. 3 or 8),
side by side on the CPU.

At tensor parallel size 1 a rank serves all ranges of a layer: output ranges run as one fused
call (as q/k/v do), input ranges whose width is a whole number of groups are joined back into one
linear at load, and ragged ones (SmolLM2's o_proj at K = 3: 192 = 128 + 64 inputs per range) run
as one call per range, summed. Each layer of vLLM's model (qkv, o, gate_up, down per decoder
layer) is prepared as vLLM prepares it; the two checkpoints' layers are called alternately, layer
after layer through the whole model (the real working set), and each M (tokens per call) takes
the median over --calls passes; the sweep is repeated and the median of the repeats reported.

    .venv/bin/python bench/tp_overhead.py /tmp/smollm2-tp1 /tmp/smollm2-tp3 \\
        [--m 1,8,64] [--repeats 5] [--json bench/results/tp_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfmp_serve.arch import arch_for  # noqa: E402
from sfmp_serve.format import load_checkpoint  # noqa: E402
from sfmp_serve.ops import api  # noqa: E402


def vllm_layers(path: str, tag: str) -> tuple[list[tuple[api.LayerHandle, int]], dict]:
    """Every vLLM layer of the checkpoint prepared for the op: (handle, in_features)."""
    ckpt = load_checkpoint(path, verify=False)
    spec = arch_for(ckpt.hf_config["model_type"])
    fused = {tuple(names): name for name, names in spec.fused.items()}
    groups = []
    for names in spec.input_groups:
        groups += [names] if tuple(names) in fused else [(n,) for n in names]
    handles = []
    for i in range(ckpt.hf_config["num_hidden_layers"]):
        for names in groups:
            full = tuple(f"{spec.layers_path}.{i}.{n}" for n in names)
            shards = tuple(ckpt.packed(n) for n in full)
            handle = api.prepare_layer(f"{tag}:{full[0]}", full, shards, ckpt.config,
                                       torch.bfloat16, "cpu")
            handles.append((handle, shards[0].in_features))
    return handles, {"tp_shards": ckpt.config.tp_shards, "bits_per_weight":
                     ckpt.config.bits_per_weight}


def model_pass(layers: list[tuple[api.LayerHandle, int]], xs: dict[int, torch.Tensor]) -> float:
    start = time.perf_counter()
    for handle, k in layers:
        api.linear(xs[k], handle)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("without", help="checkpoint quantized with --tp-shards 1")
    parser.add_argument("with_ranges", help="the same model quantized with --tp-shards K")
    parser.add_argument("--m", default="1,8,64")
    parser.add_argument("--calls", type=int, default=20, help="model passes per M and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    a, meta_a = vllm_layers(args.without, "a")
    b, meta_b = vllm_layers(args.with_ranges, "b")
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for _, k in a}
        model_pass(a, xs), model_pass(b, xs)  # warm-up (runtime layouts, caches)
        ratios, ta, tb = [], [], []
        for _ in range(args.repeats):
            times_a, times_b = [], []
            for _ in range(args.calls):  # alternate, so drift in load hits both alike
                times_a.append(model_pass(a, xs))
                times_b.append(model_pass(b, xs))
            ta.append(statistics.median(times_a))
            tb.append(statistics.median(times_b))
            ratios.append(tb[-1] / ta[-1])
        rows.append({"m": m, "ms_without": statistics.median(ta) * 1e3,
                     "ms_with": statistics.median(tb) * 1e3,
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)})
        r = rows[-1]
        print(f"M={m:4d}  tp_shards {meta_a['tp_shards']}: {r['ms_without']:.3f} ms  "
              f"tp_shards {meta_b['tp_shards']}: {r['ms_with']:.3f} ms  ratio {r['ratio']:.3f} "
              f"({r['ratio_min']:.3f}..{r['ratio_max']:.3f}) per pass over all decoder linears")
    load = os.getloadavg()
    print(f"threads {args.threads}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"without": {"path": args.without, **meta_a}, "with": {"path": args.with_ranges,
                                                                  **meta_b},
             "threads": args.threads, "loadavg": load, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
