"""Resident memory of `sfmp quantize` over its layers, and what a resume saves.

Runs `sfmp quantize MODEL ARGS --out OUT` under `/usr/bin/time -f "%M KB %e s"` and samples
the quantizing process's RSS (/proc/PID/status VmRSS) every 0.2 s, reading the layer it is on
from its progress bar ("quantize (...): k/N"). Prints, as JSON: the peak RSS and wall time from
/usr/bin/time, and the largest RSS seen while each layer was being quantized.

    python bench/low_memory_rss.py MODEL --out OUT [--code DIR] [--crash-after-layer K] \
        -- --bits 3.25 --method gptq --low-memory --calib calib.txt ...

--code DIR runs another checkout's sfmp (PYTHONPATH=DIR), e.g. the code before this change;
--crash-after-layer K kills the run (SIGKILL, offline/writer.py's SFMP_CRASH_AT hook) once
layer K is recorded, to measure a killed run and then `--resume`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

PROGRESS = re.compile(r"quantize \([a-z]+\):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def python_child(pid: int) -> int | None:
    """The process /usr/bin/time started (its only child)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--code", help="checkout whose sfmp to run (default: this one)")
    parser.add_argument("--crash-after-layer", type=int)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1:]
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = args.code
    if args.crash_after_layer is not None:
        env["SFMP_CRASH_AT"] = f"unit:{args.crash_after_layer}"
    cmd = ["/usr/bin/time", "-f", "TIME %M KB %e s", sys.executable, "-m",
           "sfmp_serve.cli.main", "quantize", args.model, *extra, "--out", args.out]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            cwd=args.code or None)
    layer = {"now": -1}
    per_layer: dict[int, int] = {}
    before_layers = [0]
    tail: list[str] = []

    def read_stderr() -> None:
        buf = b""
        while chunk := proc.stderr.read1(4096):
            buf += chunk
            *pieces, buf = re.split(rb"[\r\n]", buf)
            for piece in pieces:
                text = piece.decode(errors="replace")
                match = PROGRESS.search(text)
                if match:
                    layer["now"] = int(match.group(1))
                elif text.strip():
                    tail.append(text)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    start = time.perf_counter()
    while proc.poll() is None:
        child = python_child(proc.pid)
        rss = rss_kb(child) if child else None
        if rss is not None:
            if layer["now"] < 0:
                before_layers[0] = max(before_layers[0], rss)
            else:
                per_layer[layer["now"]] = max(per_layer.get(layer["now"], 0), rss)
        time.sleep(0.2)
    reader.join(5)
    timing = next((t for t in tail if t.startswith("TIME ")), "")
    peak = re.search(r"TIME (\d+) KB ([\d.]+) s", timing)
    print(json.dumps({
        "command": " ".join(cmd[4:]), "crash_after_layer": args.crash_after_layer,
        "returncode": proc.returncode, "killed": "terminated by signal 9" in "\n".join(tail),
        "peak_rss_kb": int(peak.group(1)) if peak else None,
        "wall_s": float(peak.group(2)) if peak else time.perf_counter() - start,
        "max_rss_kb_before_layer_loop": before_layers[0],
        "max_rss_kb_while_k_layers_done": dict(sorted(per_layer.items())),
        "load_average": os.getloadavg(),
        "errors": [t for t in tail if "error" in t.lower()][-3:]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
