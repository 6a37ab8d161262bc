"""Quality table: perplexity vs bits per weight for SFMP and uniform g128, per method.

For every target BPW (default 2.5, 3.0, 3.5, 4.0) and method (rtn, awq, gptq):
- SFMP: mixed precision with average code bits = BPW - overhead, the overhead being what the
  format stores besides the codes (alpha + beta per group, bit/offset tables, permutations),
  computed exactly from the model's linear shapes;
- uniform: every block the same integer bits, identity orders, the integer nearest to the same
  code bits (SmolLM2 at g128: 2.5 -> 2, 3.0 -> 3, 3.5 -> 3, 4.0 -> 4; repeats run once);
plus the unquantized model. Each checkpoint is written by the real pipeline and scored by
`sfmp eval ppl`'s code path on held-out text (default: Newton's "Opticks", which ships with the
installed apache-tvm-ffi package; calibration never sees it: it is data-free by default).

Every run uses the product defaults unless a named setting is given (`--name NAME` with
`--policy`, `--levels`, `--clip`): its runs are labelled `...@NAME`, so ablations one change at a
time land in the same results file and table as the main runs.

Writes OUT/results.json (appended as runs finish; finished runs are skipped on a rerun),
OUT/quality.md (the table) and OUT/quality.png or --plot (ppl vs BPW, one line per method).

    .venv/bin/python bench/quality.py --model models/smollm2-bf16 --out bench/results/quality \
        --plot docs/quality.png
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger("bench.quality")

HELDOUT_PACKAGE, HELDOUT_FILE = "tvm_ffi", "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"


@dataclass(frozen=True)
class Setting:
    """The product options a run is quantized with (the issue-15 flags); `name` tells the
    ablation rows apart and is empty for the defaults."""

    name: str = ""
    policy: str | None = None  # None: the product's default
    levels: int = 2
    clip: str | None = None  # rtn/gptq: minmax or fisher; None = the method's default
    tp_shards: int | None = None  # None: the product's default (the largest <= 8 that fits)
    tp_by_width: bool = False  # attention ranges by width, heads or not (measurement only)

    def method_args(self, method: str) -> dict:
        from offline.quantizers.base import method_config

        has_clip = "clip" in {f.name for f in fields(method_config(method, {}))}
        return {"clip": self.clip} if self.clip is not None and has_clip else {}


@dataclass(frozen=True)
class Run:
    family: str  # "sfmp" or "uniform"
    method: str
    bits: float  # --bits given to the pipeline (average code bits)
    nominal_bpw: float  # the BPW column this run stands for (first one that asked for it)
    setting: Setting = Setting()

    @property
    def label(self) -> str:
        base = f"{self.family}-{self.method}-{self.bits:g}"
        return f"{base}@{self.setting.name}" if self.setting.name else base


def default_heldout_text() -> Path:
    """A long English prose text shipped inside an installed package (not calibration data)."""
    spec = importlib.util.find_spec(HELDOUT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"held-out text: package {HELDOUT_PACKAGE} is not installed; "
                         "pass --text FILE")
    path = Path(list(spec.submodule_search_locations)[0]) / HELDOUT_FILE
    if not path.is_file():
        raise SystemExit(f"held-out text {path} not found; pass --text FILE")
    return path


def model_dtype(model_dir: str):
    """The torch dtype the model was saved in (its scales are stored in it too)."""
    import torch

    from sfmp_serve.format import read_hf_config

    config = read_hf_config(model_dir)
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")


def storage_line(model_dir: str, group_size: int, block_rows: int,
                 setting: Setting = Setting()) -> tuple[float, float]:
    """(overhead, slope): stored bits per weight = overhead + slope * code bits, exact for
    uniform bits. overhead is what the format stores beyond the codes (scales, tables,
    permutations, and the extra ragged groups of tensor-parallel ranges); slope > 1 only when
    groups are padded to whole 32-bit words. Computed from the decoder linears' shapes in the
    safetensors headers."""
    import torch
    from safetensors import safe_open

    from offline.export import packed_nbytes
    from offline.tp_plan import LinearShape, plan_tp
    from sfmp_serve.arch import arch_for
    from sfmp_serve.format import LayerGeometry, linear_ranges, read_hf_config, relative_name

    hf_config = read_hf_config(model_dir)
    spec = arch_for(hf_config["model_type"])
    dtype = model_dtype(model_dir)
    suffixes = tuple(f".{name}.weight" for name in spec.linears)
    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(spec.layers_path + ".") and key.endswith(suffixes):
                    shapes[key.removesuffix(".weight")] = handle.get_slice(key).get_shape()
    tp = plan_tp(setting.tp_shards, spec, hf_config,
                 [LinearShape(relative_name(n), *s) for n, s in shapes.items()],
                 not setting.tp_by_width)
    stored = {1: 0, 2: 0}
    weights = 0
    for name, (n, k) in shapes.items():
        geo = LayerGeometry(n, k, group_size, block_rows, *linear_ranges(tp.ranges, name))
        for bits in stored:
            table = torch.full((geo.n_block_rows, geo.n_groups), bits, dtype=torch.uint8)
            stored[bits] += 8 * packed_nbytes(geo, table, dtype)
        weights += n * k
    slope = (stored[2] - stored[1]) / weights
    return stored[1] / weights - slope, slope


def plan_runs(bpws: list[float], methods: list[str], overhead: float,
              slope: float = 1.0, setting: Setting = Setting(),
              families: tuple[str, ...] = ("sfmp", "uniform")) -> list[Run]:
    """SFMP and uniform runs for every BPW target (code bits = (BPW - overhead) / slope)."""
    runs: dict[str, Run] = {}
    for bpw in bpws:
        code_bits = round((bpw - overhead) / slope, 4)
        uniform_bits = min(8, max(1, round(code_bits)))
        for method in methods:
            for run in (Run("sfmp", method, code_bits, bpw, setting),
                        Run("uniform", method, float(uniform_bits), bpw, setting)):
                if run.family in families:
                    runs.setdefault(run.label, run)
    return list(runs.values())


def perplexity(path: Path, text: str, seqlen: int, max_tokens: int | None) -> dict:
    from sfmp_serve.eval.hf_ppl import hf_perplexity, load_model_and_tokenizer
    from sfmp_serve.eval.windows import tokenize_windows

    model, tokenizer = load_model_and_tokenizer(path, "cpu")
    windows = tokenize_windows(tokenizer, text, seqlen, max_tokens)
    result = hf_perplexity(model, windows, seqlen)
    del model
    gc.collect()
    return {"ppl": result.ppl, "eval_tokens": result.tokens}


def quantize(run: Run, args: argparse.Namespace, out: Path) -> dict:
    from offline.pipeline import QuantizeOptions, quantize_model, save_result

    options = QuantizeOptions(bits=run.bits, budget_gb=None, group_size=args.group_size,
                              block_rows=args.block_rows, method=run.method,
                              uniform=run.family == "uniform", nsamples=args.nsamples,
                              levels=run.setting.levels,
                              **({"policy": run.setting.policy} if run.setting.policy else {}),
                              method_args=run.setting.method_args(run.method),
                              tp_shards=run.setting.tp_shards,
                              tp_whole_heads=not run.setting.tp_by_width,
                              seqlen=args.calib_seqlen, device=args.device,
                              # one Fisher pass serves every SFMP run (same model, same data)
                              salience_cache=str(Path(args.work) / "salience.safetensors"))
    start = time.perf_counter()
    result = quantize_model(args.model, options)
    save_result(result, args.model, out, overwrite=True)
    seconds = time.perf_counter() - start
    return {"avg_bits": result.config.avg_bits, "bpw": result.config.bits_per_weight,
            "tp_shards": result.config.tp_shards,
            "method_args": result.config.method_args,
            "quant_seconds": round(seconds, 1),
            "stage_seconds": {k: round(v, 1) for k, v in result.stage_seconds.items()}}


def load_results(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_all(args: argparse.Namespace) -> dict[str, dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = load_results(results_file)
    text_path = Path(args.text) if args.text else default_heldout_text()
    text = text_path.read_text(encoding="utf-8")
    setting = Setting(args.name, args.policy, args.levels, args.clip, args.tp_shards,
                      args.tp_by_width)
    overhead, slope = storage_line(args.model, args.group_size, args.block_rows, setting)
    runs = plan_runs(args.bpw, args.methods, overhead, slope, setting, tuple(args.families))
    meta = {"model": str(args.model), "text": str(text_path), "eval_seqlen": args.eval_seqlen,
            "max_tokens": args.max_tokens, "group_size": args.group_size,
            "block_rows": args.block_rows, "nsamples": args.nsamples,
            "calib_seqlen": args.calib_seqlen, "overhead_bits": round(overhead, 4),
            "bits_slope": round(slope, 4)}
    if "baseline" not in results:
        log.info("baseline: %s", args.model)
        results["baseline"] = {**perplexity(Path(args.model), text, args.eval_seqlen,
                                            args.max_tokens),
                               "bpw": float(model_dtype(args.model).itemsize * 8)}
    for run in runs:
        if run.label in results:
            continue
        ckpt = Path(args.work) / run.label
        log.info("%s: quantizing to %s", run.label, ckpt)
        record = {**asdict(run), **quantize(run, args, ckpt)}
        record.update(perplexity(ckpt, text, args.eval_seqlen, args.max_tokens))
        log.info("%s: bpw %.3f ppl %.3f (%.0f s)", run.label, record["bpw"], record["ppl"],
                 record["quant_seconds"])
        results[run.label] = record
        results["meta"] = meta
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    results["meta"] = meta
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict[str, dict]) -> str:
    meta = results.get("meta", {})
    lines = [f"Perplexity on `{meta.get('text', '?')}` ({meta.get('max_tokens') or 'all'} "
             f"tokens, windows of {meta.get('eval_seqlen', '?')}), model `{meta.get('model')}`.",
             "", "| run | method | setting | target BPW | code bits | achieved BPW | ppl | "
             "quantize s |", "|---|---|---|---|---|---|---|---|"]
    base = results.get("baseline")
    if base:
        lines.append(f"| unquantized | - | - | - | - | {base['bpw']:.2f} | {base['ppl']:.3f} "
                     "| - |")
    runs = [r for k, r in results.items() if k not in ("baseline", "meta")]
    for r in sorted(runs, key=lambda r: (r["family"], r["method"], setting_name(r), r["bpw"])):
        lines.append(f"| {r['family']} | {r['method']} | {setting_name(r) or 'default'} | "
                     f"{r['nominal_bpw']:g} | {r['avg_bits']:.3f} | {r['bpw']:.3f} | "
                     f"{r['ppl']:.3f} | {r['quant_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def setting_name(record: dict) -> str:
    return (record.get("setting") or {}).get("name", "")


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Lines of at least two points, uniform baselines always; a lone SFMP point only where no
    # other series of its method has one (the ablations at one BPW are in the table only).
    runs = [r for k, r in results.items() if k not in ("baseline", "meta")]
    for family, style in (("sfmp", "-o"), ("uniform", "--s")):
        for method, name in sorted({(r["method"], setting_name(r)) for r in runs}):
            pts = sorted((r["bpw"], r["ppl"]) for r in runs if r["family"] == family
                         and r["method"] == method and setting_name(r) == name)
            others = {round(r["bpw"], 3) for r in runs if r["family"] == "sfmp"
                      and r["method"] == method and setting_name(r) != name}
            if pts and (len(pts) > 1 or family == "uniform"
                        or round(pts[0][0], 3) not in others):
                ax.plot(*zip(*pts), style if len(pts) > 1 else style[-1], ms=7,
                        label=f"{family.upper()}-{method}" + (f" ({name})" if name else ""))
    if "baseline" in results:
        ax.axhline(results["baseline"]["ppl"], color="k", lw=1, ls=":", label="unquantized")
    ax.set_xlabel("bits per weight (codes + scales + tables)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{Path(results.get('meta', {}).get('model', '')).name}: ppl vs BPW")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--model", default="models/smollm2-bf16", help="unquantized HF directory")
    p.add_argument("--out", default="bench/results/quality", help="results directory")
    p.add_argument("--work", default="/tmp/sfmp-quality",
                   help="checkpoints and the shared salience cache")
    p.add_argument("--text", default=None, help="held-out text (default: Newton's Opticks "
                                               "from the apache-tvm-ffi package)")
    p.add_argument("--bpw", type=floats, default=[2.5, 3.0, 3.5, 4.0])
    p.add_argument("--methods", type=lambda s: s.split(","), default=["rtn", "awq", "gptq"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--block-rows", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--eval-seqlen", type=int, default=2048,
                   help="perplexity window (default: sfmp eval ppl's)")
    p.add_argument("--max-tokens", type=int, default=32768, help="held-out tokens scored")
    p.add_argument("--families", type=lambda s: s.split(","), default=["sfmp", "uniform"])
    p.add_argument("--name", default="", help="setting name, added to the run labels "
                   "(ablations: one results file, one row per setting)")
    p.add_argument("--policy", default=None, choices=("salience", "perturbation"),
                   help="block ranking (default: the product's)")
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--clip", default=None, choices=("minmax", "fisher"),
                   help="rtn/gptq clip (default: the method's own default)")
    p.add_argument("--tp-shards", type=int, default=None,
                   help="tensor-parallel ranges (default: the product's)")
    p.add_argument("--tp-by-width", action="store_true",
                   help="cut attention into --tp-shards ranges by width even where that does "
                   "not divide the heads: what the ranges cost, on a model vLLM could not "
                   "serve at that TP size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--plot", default=None, help="where the PNG goes (default OUT/quality.png)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: the table and plot of OUT/results.json as it is")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = Path(args.out)
    results = load_results(out / "results.json") if args.report_only else run_all(args)
    (out / "quality.md").write_text(table(results))
    png = Path(args.plot) if args.plot else out / "quality.png"
    plot(results, png)
    print(table(results))
    print(f"wrote {out / 'quality.md'}, {png}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
