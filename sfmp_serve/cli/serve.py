"""`sfmp serve CKPT [--host H] [--port P] [--no-verify] [--verbose] [--log-file F] [vLLM
options...]`: vLLM's OpenAI server for SFMP.

Checks the checkpoint first (sfmp_serve.preflight: checksums, structure, finite values, every
parameter of the model present; a clean one-line error instead of a stack trace from deep in
vLLM's start-up, or garbage served from a checkpoint vLLM would accept), sets PROMETHEUS_MULTIPROC_DIR to a fresh empty directory unless the caller set
one (the SFMP op runs in vLLM's engine-core process; only multiprocess mode brings its metrics to
the server's /metrics, next to vLLM's own), then runs
`python -m vllm.entrypoints.openai.api_server --model CKPT --quantization sfmp ...` as a child:
SIGTERM and SIGHUP are passed on to it, its exit status is this command's, and the metrics
directory it made is removed when vLLM exits (an exec could not clean up after itself).
Options it does not know go to vLLM unchanged, e.g. --max-model-len 2048 --dtype bfloat16.

Quiet by default: vLLM's output goes to a log file (--log-file, else a new one in the temporary
directory) and the terminal shows its path, progress while vLLM starts, the address once it
serves, vLLM's errors, and the end of the log if it fails (cli/vllm_output.py). --verbose
shows vLLM's own output instead, as containers want it (the Dockerfiles pass it).

On the CPU build of vLLM, when nothing sizes the KV cache (--kv-cache-memory-bytes,
--gpu-memory-utilization, VLLM_CPU_KVCACHE_SPACE), it passes --kv-cache-memory-bytes with a
quarter of the memory the OS reports available, at most 4 GiB: vLLM's own default reserves a
fixed fraction of the node's memory and refuses to start when free memory (page cache not
counted) is below it, which on a machine that has read a few files is most of the time.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sfmp_serve.cli.vllm_output import Quiet, child_warnings, quiet_for, report_exit, say, watch
from sfmp_serve.errors import SFMPError

logger = logging.getLogger(__name__)

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
# vLLM options this command sets itself.
_OWN_OPTIONS = ("--model", "--quantization", "-q")
_TP_OPTIONS = ("--tensor-parallel-size", "-tp")
_PP_OPTIONS = ("--pipeline-parallel-size", "-pp")
# vLLM's CPU workers bind their OpenMP threads to cores; its automatic binding asserts with
# several workers on one NUMA node (every 1-socket machine), so `sfmp serve` splits the cores.
_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
# vLLM options (and the legacy variable) that size the CPU KV cache.
_KV_OPTIONS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
KV_CACHE_FRACTION = 0.25  # of the memory available at start-up
KV_CACHE_MAX_BYTES = 4 << 30
KV_CACHE_MIN_BYTES = 256 << 20
# Measured by bench/verify_cost.py (docs/integrity.md), for --no-verify's help.
VERIFY_SECONDS_PER_GB = 0.3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve an SFMP checkpoint with vLLM's OpenAI-compatible server",
        usage="sfmp serve CKPT [--host HOST] [--port PORT] [--no-verify] [--verbose] "
              "[--log-file FILE] [vLLM options ...]",
        description=__doc__.split("\n\n")[0],
        epilog="Every other option is passed to vLLM's OpenAI server unchanged.")
    parser.add_argument("checkpoint", help="SFMP checkpoint directory (from `sfmp quantize`)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default: %(default)s)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the checksum of every tensor at start-up (about "
                             f"{VERIFY_SECONDS_PER_GB} s per GB here; see docs/integrity.md); "
                             "structure, finite values and completeness are still checked")
    # dest "loud": `sfmp -v` sets "verbose" (debug logging), which implies this too.
    parser.add_argument("--verbose", dest="loud", action="store_true",
                        help="show vLLM's output here instead of writing it to the log file")
    parser.add_argument("--log-file", metavar="FILE",
                        help="where vLLM's output goes unless --verbose (default: a new "
                             "sfmp-serve-PORT-TIME.log in the temporary directory)")
    # argparse would stop at the first unknown option; collect everything after CKPT instead
    # and take --host/--port out of it again in `split_args`.
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def split_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """(this command's options, options for vLLM), whatever the order on the command line."""
    inner = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    inner.add_argument("--host", default=args.host)
    inner.add_argument("--port", type=int, default=args.port)
    inner.add_argument("--no-verify", action="store_true", default=args.no_verify)
    inner.add_argument("--verbose", dest="loud", action="store_true", default=args.loud)
    inner.add_argument("--log-file", default=args.log_file)
    try:
        known, rest = inner.parse_known_args(args.vllm_args)
    except SystemExit as e:  # argparse already printed why
        raise SFMPError("invalid --host/--port/--log-file") from e
    for i, arg in enumerate(rest):
        name, _, inline = arg.partition("=")
        if name in _OWN_OPTIONS:
            raise SFMPError(f"option {name}: `sfmp serve` sets it (the model is the CKPT "
                            "argument, the quantization is sfmp)")
        if name in _TP_OPTIONS or name in _PP_OPTIONS:
            value = inline or (rest[i + 1] if i + 1 < len(rest) else "")
            if not value.isdigit() or int(value) < 1:
                raise SFMPError(f"option {name} {value!r}: expected a positive integer")
            setattr(known, "tensor_parallel" if name in _TP_OPTIONS else "pipeline_parallel",
                    int(value))
    known.loud = known.loud or getattr(args, "verbose", False)
    return known, rest


def log_path(given: str | None, port: int) -> Path:
    """vLLM's log file: `given` (its directory must exist), else a new one in the temp dir."""
    if given is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path(tempfile.gettempdir()) / f"sfmp-serve-{port}-{stamp}.log"
    path = Path(given)
    if path.is_dir() or not path.parent.is_dir():
        raise SFMPError(f"--log-file {given}: not a file in an existing directory")
    return path


def check_checkpoint(path: str, verify: bool = True, tensor_parallel: int = 1) -> None:
    """Check the checkpoint completely before vLLM starts (sfmp_serve.preflight), and that
    it can be served at the tensor parallel size asked for."""
    from sfmp_serve.format import SFMPConfig, read_hf_config
    from sfmp_serve.preflight import check_checkpoint as preflight
    from sfmp_serve.tp import check_tensor_parallel

    report = preflight(path, verify)
    config = SFMPConfig.from_dict(read_hf_config(path)["quantization_config"])
    try:
        check_tensor_parallel(config, tensor_parallel)
    except SFMPError as e:
        raise SFMPError(f"{path}: {e}") from None
    if not verify:
        logger.warning("%s: --no-verify: tensors not compared with their checksums; "
                       "corruption after export goes unnoticed", path)
    logger.debug("%s", report)


def cpu_binding(workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `workers` CPU workers: the cores this process may use, in
    equal consecutive sets ("0-7|8-15"), or "nobind" when there are fewer cores than workers."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < workers:
        return "nobind"
    size = len(cores) // workers
    sets = [cores[i * size:(i + 1) * size] for i in range(workers)]
    return "|".join(",".join(map(str, s)) for s in sets)


def available_memory() -> int:
    """Bytes the OS could give a new allocation now (page cache counts as available)."""
    import psutil  # a dependency of vLLM
    return int(psutil.virtual_memory().available)


def kv_cache_args(extra: list[str], env: dict[str, str]) -> list[str]:
    """`--kv-cache-memory-bytes N` for vLLM's CPU platform when the user sized nothing."""
    import torch

    sized = any(arg.partition("=")[0] in _KV_OPTIONS for arg in extra) or env.get(_KV_ENV)
    if sized or torch.cuda.is_available():
        return []
    available = available_memory()
    size = max(KV_CACHE_MIN_BYTES, min(KV_CACHE_MAX_BYTES, int(available * KV_CACHE_FRACTION)))
    logger.info("KV cache: %.2f GiB (a quarter of the %.1f GiB available, at most 4 GiB; "
                "--kv-cache-memory-bytes sets it)", size / 2**30, available / 2**30)
    return ["--kv-cache-memory-bytes", str(size)]


def metrics_dir(env: dict[str, str]) -> str:
    """PROMETHEUS_MULTIPROC_DIR: the caller's (created if missing) or a fresh temp dir."""
    given = env.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        return tempfile.mkdtemp(prefix="sfmp-prometheus-")
    Path(given).mkdir(parents=True, exist_ok=True)
    if any(Path(given).iterdir()):
        logger.warning("PROMETHEUS_MULTIPROC_DIR=%s is not empty: metrics of earlier runs "
                       "will be mixed in", given)
    return given


def vllm_command(checkpoint: str, host: str, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", VLLM_SERVER, "--model", checkpoint, "--quantization", "sfmp",
            "--host", host, "--port", str(port), *extra]


def supervise(command: list[str], env: dict[str, str], quiet: Quiet | None = None) -> int:
    """Run `command` to its end; SIGTERM/SIGHUP sent to this process are passed on to it.

    SIGINT is not passed on: Ctrl-C reaches the child directly (same foreground process group)
    and a second SIGINT would make vLLM skip its graceful shutdown. `quiet`: the child's output
    goes to quiet.log and the terminal is told how it goes (vllm_output.watch). Returns the
    child's exit status, 128 + N when signal N ended it (the shell's convention).
    """
    stopped: list[int] = []
    if quiet is None:
        child = subprocess.Popen(command, env=env)
    else:
        with open(quiet.log, "ab") as log:  # the child keeps its own descriptor
            child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def forward(signum: int, _frame) -> None:
        stopped.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    handlers = {signal.SIGTERM: forward, signal.SIGHUP: forward,
                signal.SIGINT: lambda signum, _frame: stopped.append(signum)}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        code, ready = (child.wait(), True) if quiet is None else watch(child, quiet, stopped)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = 128 - code if code < 0 else code
    if quiet is not None:
        report_exit(code, quiet, ready, bool(stopped))
    return code


def run(args: argparse.Namespace) -> int:
    from sfmp_serve.preflight import PREFLIGHT_ENV

    own, extra = split_args(args)
    quiet = None if own.loud else quiet_for(log_path(own.log_file, own.port), own.host, own.port)
    check_checkpoint(args.checkpoint, not own.no_verify, getattr(own, "tensor_parallel", 1))
    env = dict(os.environ)
    env[PREFLIGHT_ENV] = os.path.realpath(args.checkpoint)  # the plugin need not check again
    env["PYTHONWARNINGS"] = child_warnings(env)
    workers = getattr(own, "tensor_parallel", 1) * getattr(own, "pipeline_parallel", 1)
    if workers > 1 and _BIND_ENV not in env:
        env[_BIND_ENV] = cpu_binding(workers)
        logger.info("%s=%s (vLLM's CPU workers: one set of cores each; ignored on GPUs)",
                    _BIND_ENV, env[_BIND_ENV])
    own_metrics_dir = not env.get("PROMETHEUS_MULTIPROC_DIR")
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir(env)
    command = vllm_command(args.checkpoint, own.host, own.port,
                           extra + kv_cache_args(extra, env))
    logger.log(logging.INFO if quiet is None else logging.DEBUG,
               "PROMETHEUS_MULTIPROC_DIR=%s; running %s", env["PROMETHEUS_MULTIPROC_DIR"],
               " ".join(command))
    if quiet is not None:
        say(f"starting vLLM; its log: {quiet.log} (--verbose shows it here)")
    try:
        return supervise(command, env, quiet)
    finally:
        if own_metrics_dir:
            shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
