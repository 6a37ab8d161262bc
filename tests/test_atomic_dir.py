"""Crash-safe output directories: a kill or a failure at every filesystem call of a write or an
--overwrite leaves the old or the new checkpoint at the path (after the next run's recovery,
which reports what it found), never nothing and never a mix; SIGTERM is Ctrl-C."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sfmp_serve import atomic_dir
from sfmp_serve.atomic_dir import atomic_directory, recover
from sfmp_serve.cli import main as cli_main
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import load_checkpoint, write_checkpoint
from tests.offline.helpers import make_config, random_packed

NAME = "model.layers.0.mlp.down_proj"
# Calls of os/shutil that are not filesystem operations.
_NOT_FS = {"getpid", "kill", "umask", "fspath", "strerror"}


class FaultyFs:
    """Stands in for `os` or `shutil` inside atomic_dir: records every filesystem call and
    fails from call number `fail_at` on. kill=True: every later call fails too, as nothing runs
    in a killed process (the clean-up that would follow cannot either)."""

    def __init__(self, trace: list[str], fail_at: int | None = None, kill: bool = False):
        self.trace, self.fail_at, self.kill = trace, fail_at, kill

    def proxy(self, module):
        fs = self

        class Proxy:
            def __getattr__(self, name):
                attr = getattr(module, name)
                if not callable(attr) or isinstance(attr, type) or name in _NOT_FS:
                    return attr

                def call(*args, **kwargs):
                    fs.trace.append(f"{module.__name__}.{name}")
                    n = len(fs.trace)
                    if fs.fail_at is not None and (n == fs.fail_at or (fs.kill and n > fs.fail_at)):
                        raise OSError(errno.EIO, f"injected failure of {name}")
                    return attr(*args, **kwargs)
                return call
        return Proxy()


@pytest.fixture
def tensors():
    config = make_config(modules=(NAME,))
    packed, _ = random_packed(37, 45, config, seed=4)
    return config, {**packed.to_tensors(NAME), "model.norm.weight": torch.ones(45)}


def write(path, tensors, marker, monkeypatch=None, fs=None):
    if fs is not None:
        monkeypatch.setattr(atomic_dir, "os", fs.proxy(os))
        monkeypatch.setattr(atomic_dir, "shutil", fs.proxy(shutil))
    try:
        config, t = tensors
        return write_checkpoint(path, {"model_type": "llama", "marker": marker}, config, t,
                                overwrite=True)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def marker(path):
    """'old' or 'new': which complete checkpoint is at `path` (loading it checks it whole)."""
    return load_checkpoint(path).hf_config["marker"]


def leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def clean_trace(tmp_path, tensors, monkeypatch, replace: bool) -> list[str]:
    out = tmp_path / "trace" / "ckpt"
    if replace:
        write(out, tensors, "old")
    trace: list[str] = []
    write(out, tensors, "new", monkeypatch, FaultyFs(trace))
    assert marker(out) == "new" and leftovers(out) == []
    return trace


@pytest.mark.parametrize("kill", [True, False], ids=["kill", "error"])
@pytest.mark.parametrize("replace", [True, False], ids=["overwrite", "first-write"])
def test_failure_at_every_filesystem_call(tmp_path, tensors, monkeypatch, caplog, kill,
                                          replace):
    trace = clean_trace(tmp_path, tensors, monkeypatch, replace)
    renames = [i for i, name in enumerate(trace, 1) if name == "os.rename"]
    # tmp -> new, [out -> old,] new -> out; then the parent's fsync and the old one deleted
    assert len(renames) == (3 if replace else 2) and trace.count("os.fsync") >= 4
    assert ("shutil.rmtree" in trace) == replace
    swapped = renames[-1]  # the call that puts the new one at the path
    # A killed run's new directory takes the path once the swap has begun (old moved aside),
    # or once complete if there was no old one: the next run's recovery finishes it.
    committed = renames[1] if replace else renames[0]
    for n in range(1, len(trace) + 1):
        where = f"call {n} ({trace[n - 1]}), {'kill' if kill else 'error'}"
        out = tmp_path / f"{n}" / "ckpt"
        if replace:
            write(out, tensors, "old")
        try:
            write(out, tensors, "new", monkeypatch, FaultyFs([], fail_at=n, kill=kill))
            raised = False
        except SFMPError as e:
            assert str(e).startswith(f"{out}: ") and "injected failure" in str(e), where
            raised = True
        if not kill:  # an error is reported unless the new one was already in place
            assert raised == (n <= swapped), where
        # Right after: the old or the new one at the path; only a kill between the two
        # renames of the swap leaves the path empty (both complete beside it).
        if out.exists():
            assert marker(out) in ("old", "new"), where
        else:
            assert not replace or (kill and n == swapped), where
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sfmp_serve.atomic_dir"):
            found = leftovers(out)
            report = recover(out)  # what the next run does first
        assert bool(report) == bool(found), where
        assert [r.getMessage() for r in caplog.records] == [f"{out}: {m}" for m in report]
        assert leftovers(out) == [], where
        new = n > (committed if kill else swapped)
        if new or replace:
            assert marker(out) == ("new" if new else "old"), where
        else:
            assert not out.exists(), where


def test_sigkilled_writer_is_reported_and_removed_by_the_next_run(tmp_path, tensors, caplog):
    out = tmp_path / "ckpt"
    write(out, tensors, "old")
    script = (
        "import os, signal, sys\n"
        "from sfmp_serve.atomic_dir import atomic_directory\n"
        "with atomic_directory(sys.argv[1], overwrite=True) as tmp:\n"
        "    (tmp / 'config.json').write_text('{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    stale = leftovers(out)
    assert len(stale) == 1 and stale[0].startswith(".ckpt.sfmp-tmp-")
    with caplog.at_level(logging.WARNING, logger="sfmp_serve.atomic_dir"):
        write(out, tensors, "new")
    assert f"removed {stale[0]}, the incomplete output of an interrupted run" in caplog.text
    assert marker(out) == "new" and leftovers(out) == []


def test_directories_of_a_live_writer_and_of_other_paths_are_left_alone(tmp_path):
    out = tmp_path / "ckpt"
    live = tmp_path / f".ckpt.sfmp-tmp-{os.getppid()}-0a1b2c3d"  # a running process's
    other = tmp_path / f".ckpt2.sfmp-tmp-999999-0a1b2c3d"
    mine = tmp_path / ".ckpt.notours"
    legacy = tmp_path / ".ckpt.x7_k2m9q"  # tempfile.mkdtemp of earlier versions
    for d in (live, other, mine, legacy):
        d.mkdir()
    assert recover(out) == ["removed .ckpt.x7_k2m9q, the incomplete output of an interrupted "
                            "run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, other, mine))


def test_interrupted_swap_is_finished_or_undone(tmp_path):
    out = tmp_path / "ckpt"
    new = tmp_path / ".ckpt.sfmp-new-999999-00000001"
    old = tmp_path / ".ckpt.sfmp-old-999999-00000001"
    for d, m in ((new, "new"), (old, "old")):
        d.mkdir()
        (d / "m").write_text(m)
    assert recover(out) == [
        f"moved {new.name} into place: the run that wrote it was interrupted while replacing "
        "the old directory", f"removed {old.name}, the replaced directory of an interrupted run"]
    assert (out / "m").read_text() == "new"
    shutil.rmtree(out)
    old.mkdir()
    (old / "m").write_text("old")
    assert recover(out) == [f"restored {old.name}: an interrupted run had moved it aside"]
    assert (out / "m").read_text() == "old" and leftovers(out) == []


def test_signals_during_the_swap_wait_until_it_is_done(tmp_path, tensors, monkeypatch):
    """SIGTERM (handled like Ctrl-C) arriving between the renames is delivered after them."""
    out = tmp_path / "ckpt"
    write(out, tensors, "old")
    real_rename = os.rename
    calls = []

    class Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def rename(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # out -> old: the swap has begun
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # a handler would run here, were the signal not held
            real_rename(src, dst)

    monkeypatch.setattr(atomic_dir, "os", Os())
    previous = signal.signal(signal.SIGTERM, cli_main._terminate)
    try:
        with pytest.raises(cli_main.Terminated):
            write(out, tensors, "new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) == 3 and marker(out) == "new"
    recover(out)  # the replaced directory, whose deletion the signal preempted
    assert leftovers(out) == []


def test_sigterm_while_writing_is_handled_like_ctrl_c(tmp_path, tensors, monkeypatch, capsys):
    import sfmp_serve.weights_file as weights_file

    out = tmp_path / "ckpt"
    write(out, tensors, "old")

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
        pytest.fail("SIGTERM was not handled")

    monkeypatch.setattr(weights_file, "write_safetensors", terminated)
    monkeypatch.setattr(cli_main, "build_parser", lambda: _parser_writing(out, tensors))
    assert cli_main.main(["write"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "sfmp write: terminated (SIGTERM)"
    assert marker(out) == "old" and leftovers(out) == []
    assert signal.getsignal(signal.SIGTERM) is not cli_main._terminate  # restored


def _parser_writing(out, tensors):
    import argparse
    parser = argparse.ArgumentParser(prog="sfmp")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("write").set_defaults(func=lambda args: write(out, tensors, "new") and 0)
    return parser


def test_existing_output_without_overwrite_and_unwritable_parent(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(SFMPError, match="exists \\(pass --overwrite"):
        with atomic_directory(out):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(SFMPError, match="cannot prepare the output directory"):
        with atomic_directory(tmp_path / "file" / "ckpt"):
            pass
    with pytest.raises(SFMPError, match="file: exists and is not a directory"):
        with atomic_directory(tmp_path / "file", overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "x" and leftovers(tmp_path / "file") == []
