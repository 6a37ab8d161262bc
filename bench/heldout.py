"""Write the held-out evaluation text used by every benchmark in docs/results.md.

The text is the Python reference manual's topic pages (`pydoc_data.topics`), which ship with
every CPython install: English prose with code, fixed for a given Python version, and unrelated
to the calibration data (the pipeline's default calibration samples text from the model itself).

    python bench/heldout.py OUT.txt [--chars N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pydoc_data.topics as topics


def heldout_text(chars: int | None = None) -> str:
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text if chars is None else text[:chars]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--chars", type=int, default=None, help="truncate to N characters")
    args = parser.parse_args()
    args.out.write_text(heldout_text(args.chars))
    print(f"wrote {args.out} (python {sys.version.split()[0]} pydoc_data.topics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
