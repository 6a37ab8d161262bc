"""Issue-2 benchmark: `sfmp quantize` times, sizes and held-out perplexity, SFMP vs uniform RTN.

For each SFMP target it quantizes with the default (data-free) calibration and records per-stage
times, bits per weight and size on disk; uniform RTN baselines are chosen at the *same* bits per
weight by changing the group size: bf16 alpha + beta cost 32 bits per group, i.e. 0.25 / 0.5 / 1.0
bits per weight at g128 / g64 / g32, so 2-bit g32, 3-bit g64 and 3-bit g32 store exactly as many
bits as SFMP 2.75, 3.25 and 3.75 at g128 (both store the same permutations); plus plain 3- and
4-bit g128. Perplexity is measured on bench/heldout.py's text.

    python bench/pipeline_quality.py MODEL_DIR --work runs/pipeline [--max-tokens 8192]
Prints a markdown table and writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

from offline.pipeline import QuantizeOptions, quantize_model, save_result

SFMP_BITS = (2.75, 3.25, 3.75)
# (bits, group size): uniform baselines, the first three at the BPW of the SFMP runs above.
UNIFORM = ((2, 32), (3, 64), (3, 32), (3, 128), (4, 128))


def sfmp_cli(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "sfmp_serve.cli.main", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def quantize(model: Path, out: Path, options: QuantizeOptions) -> dict:
    start = time.perf_counter()
    result = quantize_model(model, options)
    save_result(result, model, out, overwrite=True)
    return {"stage_seconds": result.stage_seconds, "total_s": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--work", type=Path, default=Path("runs/pipeline"))
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    args.work.mkdir(parents=True, exist_ok=True)
    text = args.work / "heldout.txt"
    subprocess.run([sys.executable, "bench/heldout.py", str(text)], check=True)

    def ppl(path: Path) -> float:
        return sfmp_cli("eval", "ppl", str(path), "--text", str(text), "--seqlen",
                        str(args.seqlen), "--max-tokens", str(args.max_tokens), "--json")["ppl"]

    rows = [{"name": "bf16", "ppl": ppl(args.model), "bpw": 16.0}]
    # The SFMP runs share one calibration and Fisher pass (--salience-cache): the first run's
    # stage times include them, the others load the stored salience.
    cache = str(args.work / "fisher.safetensors")
    runs = [(f"SFMP rtn {b}", QuantizeOptions(bits=b, budget_gb=None, salience_cache=cache))
            for b in SFMP_BITS]
    runs += [(f"uniform rtn {b}-bit g{g}",
              QuantizeOptions(bits=b, budget_gb=None, group_size=g, uniform=True))
             for b, g in UNIFORM]
    for name, options in runs:
        out = args.work / name.replace(" ", "_")
        row = {"name": name, **quantize(args.model, out, options)}
        info = sfmp_cli("inspect", str(out), "--json")
        row.update(avg_bits=info["avg_bits"], bpw=info["bits_per_weight"],
                   size_bytes=info["size_bytes"], original_size_bytes=info["original_size_bytes"],
                   ppl=ppl(out))
        rows.append(row)
        logging.info("%s: %s", name, row)
    meta = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%F"),
            "max_tokens": args.max_tokens, "seqlen": args.seqlen}
    (args.work / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| config | avg code bits | bits/weight | size MB | ppl | quantize s | calib s | "
          "salience s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r.get("stage_seconds", {})
        print(f"| {r['name']} | {r.get('avg_bits', '-')} | {r['bpw']:.3f} | "
              f"{r.get('size_bytes', 0) / 1e6:.1f} | {r['ppl']:.3f} | {r.get('total_s', 0):.0f} | "
              f"{st.get('calibration', 0):.0f} | {st.get('salience', 0):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
