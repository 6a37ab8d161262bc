"""Output directories that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sfmp_serve.errors import SFMPError


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to fill; rename it to `out_dir` on success.

    An exception or Ctrl-C inside the block removes the temporary directory, so no partial
    output is ever left behind. The result gets the permissions a plain mkdir would have
    (mkdtemp makes it 0700), so a server running as another user or in a container can read it.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SFMPError(f"{out}: output directory exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
