"""vLLM's output for `sfmp serve`: a log file, while the terminal shows only what a user needs.

Quiet (the default): vLLM writes to the log file; the terminal gets where the log is, a line
every PROGRESS_EVERY_S seconds while vLLM starts, one line when /health answers (the address to
use), vLLM's ERROR/CRITICAL lines once it serves, and on an unexpected exit the end of the log
with the error in it. The environment's noise (Triton's "no CPU backend" notice, nanobind's
reference-leak report at exit, multiprocessing's resource-tracker warnings) is left out of that
tail; it stays in the file, which always holds everything.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

POLL_S = 1.0
PROGRESS_EVERY_S = 30
TAIL_LINES = 25
LINE_CHARS = 400

# Python warnings in vLLM's processes that say nothing the user can act on: the entry module is
# deprecated in favour of the `vllm` console script, which the CPU wheel breaks (README), and
# torch deprecates an alias that vLLM's Triton shim touches on import. Later filters win, so
# the user's own PYTHONWARNINGS still decide.
CHILD_WARNING_FILTERS = ("ignore::DeprecationWarning:__main__",
                         "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")

_NOISE = re.compile(
    r"^nanobind: |^ - leaked |^ - \.\.\. skipped remainder|^See https://nanobind"
    r"|resource_tracker: There appear to be|^\s+warnings\.warn\('resource_tracker"
    r"|^Triton is installed, but doesn't include CPU backend")
_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b")
_FRAME = re.compile(r'^\s+File ".*", line \d+')
# What vLLM's logger puts before each line of a message: "(EngineCore pid=7) ERROR 12-01
# 18:00:34 [core.py:1] ".
_PREFIX = re.compile(r"^\([^)]*pid=\d+\) [A-Z]+ [\d-]+ [\d:]+ \[[^\]]*\] ?")
_CARETS = re.compile(r"^\s*[\^~]+\s*$")


def child_warnings(env: dict[str, str]) -> str:
    """PYTHONWARNINGS for vLLM: CHILD_WARNING_FILTERS, then whatever the user set."""
    return ",".join(filter(None, (*CHILD_WARNING_FILTERS, env.get("PYTHONWARNINGS"))))


@dataclass(frozen=True)
class Quiet:
    """Where vLLM's output goes, and how to tell the user that it serves."""

    log: Path
    health_url: str  # polled until it answers 200
    address: str  # what the user connects to, for the ready line


def quiet_for(log: Path, host: str, port: int) -> Quiet:
    """A wildcard listen address is polled (and shown) through the loopback interface."""
    local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
    address = url + (f" (listening on all interfaces, {host or '0.0.0.0'})"
                     if local != host else "")
    return Quiet(log, url + "/health", address)


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: no proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def say(message: str, error: bool = False) -> None:
    print(f"sfmp serve: {message}", file=sys.stderr if error else sys.stdout, flush=True)


def _echo_errors(log: Path, offset: int) -> int:
    """Print the ERROR/CRITICAL lines vLLM added to `log` since `offset`; the new offset."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    complete = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    for line in data[:complete].decode(errors="replace").splitlines():
        if _ERROR.search(line):
            print(line[:LINE_CHARS], file=sys.stderr, flush=True)
    return offset + complete


def watch(child: subprocess.Popen, quiet: Quiet, stopping: list[int]) -> tuple[int, bool]:
    """Wait for `child` (vLLM), telling the user how its start goes; (exit status, whether it
    became ready). Once `stopping` holds a signal, vLLM's errors are those of its shutdown
    (it logs the engine's end as one) and are no longer shown."""
    start = time.monotonic()
    next_note = PROGRESS_EVERY_S
    ready, offset = False, 0
    while True:
        try:
            return child.wait(timeout=POLL_S), ready
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.monotonic() - start
        if ready:
            if not stopping:
                offset = _echo_errors(quiet.log, offset)
        elif _healthy(quiet.health_url):
            ready = True
            offset = quiet.log.stat().st_size if quiet.log.exists() else 0
            say(f"ready after {elapsed:.0f} s: {quiet.address} (OpenAI API under /v1, "
                "metrics at /metrics)")
        elif elapsed >= next_note:
            say(f"vLLM still starting ({elapsed:.0f} s)")
            next_note += PROGRESS_EVERY_S


def _condensed(lines: Iterable[str]) -> Iterator[str]:
    """`lines` without the environment's noise and without traceback frames (each `File ...`
    line, the source line under it, and caret lines): what is left of a traceback is its
    header and the exception, so several processes' errors fit in a short tail."""
    after_frame = False
    for line in lines:
        body = _PREFIX.sub("", line)
        if after_frame and body.startswith("    "):
            after_frame = False
            continue
        after_frame = bool(_FRAME.match(body))
        if not (after_frame or _CARETS.match(body) or _NOISE.search(body)):
            yield line


def log_tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of `log`, condensed (see _condensed)."""
    try:
        with open(log, errors="replace") as f:
            kept = deque(_condensed(line.rstrip("\n") for line in f), maxlen=lines)
    except OSError:
        return []
    return [line[:LINE_CHARS] for line in kept]


def report_exit(code: int, quiet: Quiet, ready: bool, stopped: bool) -> None:
    """The last word on vLLM's exit: where the log is, and the end of it if vLLM failed."""
    if stopped or code == 0:
        say(f"vLLM {'stopped' if stopped else 'exited'} (status {code}); its log: {quiet.log}")
        return
    when = "while serving" if ready else "during start-up"
    say(f"error: vLLM exited with status {code} {when}; the end of its log ({quiet.log}):",
        error=True)
    for line in log_tail(quiet.log):
        print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()
