"""`sfmp` command line: one module per subcommand, each with `register(subparsers)`.

A subcommand module adds its parser and sets `func(args) -> int`. Heavy imports (torch, vLLM)
happen inside `func`, so `sfmp --help` stays fast. User errors (SFMPError) become one line on
stderr and exit status 2; anything else is a bug and keeps its traceback. SIGTERM is handled
like Ctrl-C (the clean-up of a half-written output runs), with the shell's status 128 + 15.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from sfmp_serve.errors import SFMPError

SUBCOMMANDS = ("import_gguf", "quantize", "inspect", "eval", "serve", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfmp", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"sfmp_serve.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sfmp_serve.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that the same clean-up runs."""


def _terminate(signum: int, _frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except SFMPError as e:
        print(f"sfmp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"sfmp {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"sfmp {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
