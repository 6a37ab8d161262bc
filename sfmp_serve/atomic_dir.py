"""Output directories that appear whole or not at all, and replace an old one crash-safely.

Everything happens beside OUT, in its parent directory, so every step is a rename within one
filesystem. The names carry the writer's process id:

    .OUT.sfmp-tmp-PID-RANDOM   being written: incomplete
    .OUT.sfmp-new-PID-RANDOM   complete and synced to disk, not yet at OUT
    .OUT.sfmp-old-PID-RANDOM   the checkpoint it replaces, moved aside, about to be deleted

Writing: fill tmp, fsync its files, rename tmp -> new; then (replacing) rename OUT -> old,
rename new -> OUT, fsync the parent, delete old. OUT holds the old or the new directory at
every moment except between the two renames, when both are complete beside it. SIGINT and
SIGTERM arriving during the renames are held until they are done.

A kill at any point (SIGKILL, power loss) is finished by the next write to OUT (`recover`,
also run by `sfmp quantize` before its work): tmp is incomplete and deleted; new is deleted if
OUT exists (the swap never began, the old one stays) or else renamed to OUT (the swap was cut
between its renames: it is finished); old is deleted if OUT exists, else renamed back. Each is
reported in the log. Directories of a live process other than this one belong to a concurrent
writer and are left alone.

Resumable writes (`sfmp quantize`, layer by layer): a tmp directory holding the RESUMABLE marker
file is a partial result that a later run can continue, so `recover` keeps it (and says so);
`resumable` lists such directories and `atomic_directory(..., adopt=PATH)` continues in one of
them (renamed to the new writer's name first, so two resuming processes cannot share it). With
`keep_interrupted`, Ctrl-C or SIGTERM inside the block leaves a resumable directory in place
instead of deleting it; any other exception still deletes it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sfmp_serve.errors import SFMPError

log = logging.getLogger(__name__)

_STATES = ("tmp", "new", "old")
RESUMABLE = ".sfmp-resumable"  # marker file (its text says what is done) of a resumable tmp
# Temporary directories of earlier versions (tempfile.mkdtemp(prefix=".OUT.")): 8 characters.
_LEGACY_SUFFIX = re.compile(r"[a-z0-9_]{8}")


def _sibling(out: Path, state: str) -> Path:
    return out.parent / f".{out.name}.sfmp-{state}-{os.getpid()}-{secrets.token_hex(4)}"


def _parse(out: Path, name: str) -> tuple[str, int | None] | None:
    """(state, pid) of a sibling directory of OUT that a writer of OUT made, else None."""
    prefix = f".{out.name}."
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    match = re.fullmatch(r"sfmp-(tmp|new|old)-(\d+)-[0-9a-f]+", rest)
    if match:
        return match.group(1), int(match.group(2))
    if _LEGACY_SUFFIX.fullmatch(rest):
        return "tmp", None
    return None


def _alive(pid: int | None) -> bool:
    """Whether `pid` is a running process other than this one (a concurrent writer)."""
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _leftovers(out: Path) -> dict[str, list[Path]]:
    """Directories of interrupted writes of `out`, by state, newest first."""
    found: dict[str, list[Path]] = {s: [] for s in _STATES}
    if not out.parent.is_dir():
        return found
    for entry in os.scandir(out.parent):
        parsed = _parse(out, entry.name)
        if parsed and entry.is_dir(follow_symlinks=False) and not _alive(parsed[1]):
            found[parsed[0]].append(Path(entry.path))
    for paths in found.values():
        paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def recover(out_dir: str | os.PathLike) -> list[str]:
    """Finish or clean up interrupted writes of `out_dir`; returns what was done (also logged).

    Afterwards `out_dir` holds the old or the new directory of an interrupted replacement (or
    nothing, if an interrupted first write had not completed), and no leftovers remain.
    """
    out = Path(out_dir)
    found = _leftovers(out)
    done = []

    def report(message: str) -> None:
        log.warning("%s: %s", out, message)
        done.append(message)

    for path in found["tmp"]:
        if (path / RESUMABLE).is_file():  # nothing done to it: logged, not reported
            log.info("%s: %s is the partial output of an interrupted run (%s)", out,
                     path.name, resumable_state(path))
            continue
        shutil.rmtree(path)
        report(f"removed {path.name}, the incomplete output of an interrupted run")
    for path in found["new"]:
        if out.exists():
            shutil.rmtree(path)
            report(f"removed {path.name}, the complete output of a run interrupted before it "
                   "replaced the directory (the old one stays)")
        else:
            os.rename(path, out)
            fsync_dir(out.parent)
            report(f"moved {path.name} into place: the run that wrote it was interrupted "
                   "while replacing the old directory")
    for path in found["old"]:
        if out.exists():
            shutil.rmtree(path)
            report(f"removed {path.name}, the replaced directory of an interrupted run")
        else:
            os.rename(path, out)
            fsync_dir(out.parent)
            report(f"restored {path.name}: an interrupted run had moved it aside")
    return done


def resumable(out_dir: str | os.PathLike) -> list[Path]:
    """Partial outputs of interrupted resumable writes of `out_dir`, newest first."""
    return [p for p in _leftovers(Path(out_dir))["tmp"] if (p / RESUMABLE).is_file()]


def resumable_state(path: Path) -> str:
    """What a resumable directory's marker says is done (for messages)."""
    try:
        return (path / RESUMABLE).read_text(encoding="utf-8").strip() or "state unknown"
    except (OSError, UnicodeDecodeError):
        return "state unknown"


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(directory: Path) -> None:
    """Flush every file of `directory` and the directory itself to disk (before the renames,
    so that a power loss cannot leave a renamed but empty checkpoint)."""
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


def _apply_umask(directory: Path) -> None:
    """The permissions a plain mkdir and open would give (the temporary directory is 0700), so a
    server running as another user or in a container can read the result."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for entry in os.scandir(directory):
        os.chmod(entry.path, (0o777 if entry.is_dir() else 0o666) & ~umask)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM received inside the block are delivered when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can handle signals; nothing to hold elsewhere
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


def _discard(path: Path | None) -> None:
    """Best-effort removal after a failure: a leftover is reported and removed by the next run,
    and must not hide the error that caused it."""
    if path is None or not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path)
    except OSError as e:
        log.warning("%s: not removed (%s); the next run removes it", path, e)


def _adopt(out: Path, partial: Path) -> Path:
    """Rename a resumable directory of `out` to this writer's tmp name."""
    tmp = _sibling(out, "tmp")
    try:
        os.rename(partial, tmp)
    except FileNotFoundError as e:
        raise SFMPError(f"{partial}: gone (another run resumed it first?)") from e
    return tmp


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False,
                     adopt: str | os.PathLike | None = None,
                     keep_interrupted: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to fill; put it at `out_dir` on success.

    An exception or a signal inside the block leaves `out_dir` as it was and nothing beside it
    (with `keep_interrupted`, Ctrl-C or SIGTERM leave the tmp directory if it holds the
    RESUMABLE marker). `adopt`: continue in that resumable directory (from `resumable`) instead
    of a new one. With `overwrite`, an existing `out_dir` is replaced only once the new one is
    complete. Errors of the filesystem become SFMPError naming `out_dir`.
    """
    out = Path(out_dir)
    try:
        recover(out)
        if out.exists() and not overwrite:
            raise SFMPError(f"{out}: output directory exists (pass --overwrite to replace it)")
        if out.exists() and not out.is_dir():
            raise SFMPError(f"{out}: exists and is not a directory; remove it or choose "
                            "another output path")
        out.parent.mkdir(parents=True, exist_ok=True)
        if adopt is not None:
            tmp = _adopt(out, Path(adopt))
        else:
            tmp = _sibling(out, "tmp")
            os.mkdir(tmp, 0o700)
    except OSError as e:
        raise SFMPError(f"{out}: cannot prepare the output directory ({e})") from e
    new = None
    try:
        yield tmp
        _apply_umask(tmp)
        _sync_tree(tmp)
        new = _sibling(out, "new")
        os.rename(tmp, new)
        tmp = None
        old = _swap(out, new)
        new = None
    except BaseException as e:
        if (keep_interrupted and isinstance(e, KeyboardInterrupt) and tmp is not None
                and (tmp / RESUMABLE).is_file()):
            log.warning("%s: interrupted; the partial output stays in %s (%s): run the same "
                        "command with --resume to continue", out, tmp.name,
                        resumable_state(tmp))
            tmp = None
        _discard(tmp)
        _discard(new)
        if isinstance(e, OSError):
            raise SFMPError(f"{out}: cannot write ({e})") from e
        raise
    _finish(out, old)


def _swap(out: Path, new: Path) -> Path | None:
    """Put the complete directory `new` at `out`; the old `out` (moved aside) is returned.
    On failure the old one is put back where possible."""
    old = None
    with _signals_held():
        if out.exists():
            old = _sibling(out, "old")
            os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:
            if old is not None:
                try:
                    os.rename(old, out)
                except OSError as e:
                    log.warning("%s: could not put the old directory back from %s (%s); the "
                                "next run finishes the replacement", out, old.name, e)
            raise
    return old


def _finish(out: Path, old: Path | None) -> None:
    """After the swap: make the renames durable and delete the old directory. The new one is
    in place, so a failure here is a warning (the next run removes what is left)."""
    try:
        fsync_dir(out.parent)
    except OSError as e:
        log.warning("%s: could not sync the parent directory (%s)", out, e)
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as e:
            log.warning("%s: the replaced directory %s was not removed (%s); the next run "
                        "removes it", out, old.name, e)
