"""Sharded, resumable `sfmp quantize`: a run killed with SIGKILL at any step and resumed gives
byte-identical files; units are written and dropped as the layers finish."""

import gc
import os
import subprocess
import sys
import weakref

import pytest

from offline import writer as writer_module
from sfmp_serve.atomic_dir import RESUMABLE
from sfmp_serve.cli.main import main
from sfmp_serve.format import load_checkpoint
from tests.tiny import CORPUS, make_tiny_model

pytestmark = pytest.mark.slow

# GPTQ reads calibration inputs, so a resumed run needs the stored hidden states too; a 100 KB
# cap gives the 4-layer model 5 shards (one per unit: embeddings, then each layer).
FLAGS = ["--bits", "3.25", "--method", "gptq", "--group-size", "32", "--block-rows", "16",
         "--nsamples", "4", "--seqlen", "64", "--max-shard-size", "100KB"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, calibration file, reference checkpoint made in one go)."""
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_model(root / "model", "llama", layers=4)
    calib = root / "calib.txt"
    calib.write_text(" ".join(CORPUS))
    ref = root / "ref"
    assert main(["quantize", str(model), *FLAGS, "--calib", str(calib), "--out", str(ref)]) == 0
    return model, calib, ref


def files(ckpt):
    """Every file's bytes; the model card names its directory, so that name is neutral."""
    out = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    out["README.md"] = out["README.md"].replace(f"./{ckpt.name}".encode(), b"./CKPT")
    out["README.md"] = out["README.md"].replace(f"# {ckpt.name}\n".encode(), b"# CKPT\n")
    out["README.md"] = out["README.md"].replace(f" {ckpt.name}/".encode(), b" CKPT/")
    out["README.md"] = out["README.md"].replace(f"--out {ckpt.name}".encode(), b"--out CKPT")
    return out


def killed_run(model, calib, out, crash, *extra):
    """`sfmp quantize` in a child process that SIGKILLs itself at `crash`."""
    env = {**os.environ, writer_module.CRASH_ENV: crash, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sfmp_serve.cli.main", "quantize", str(model),
                           *FLAGS, "--calib", str(calib), *extra, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    [partial] = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.sfmp-tmp")]
    assert (partial / RESUMABLE).is_file() and not out.exists()
    return partial


@pytest.mark.parametrize("crash,extra", [
    ("unit:1", []),  # after layer 1 was recorded
    ("part:2", ["--low-memory"]),  # layer 2 written but not recorded; resumed without the flag
    ("shard:3", []),  # a shard assembled, its parts not yet deleted, nothing recorded
])
def test_killed_and_resumed_run_is_byte_identical(setup, tmp_path, capsys, crash, extra):
    model, calib, ref = setup
    out = tmp_path / "ckpt"
    partial = killed_run(model, calib, out, crash, *extra)
    # without --resume the partial output is neither used nor lost
    rc = main(["quantize", str(model), *FLAGS, "--calib", str(calib), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "pass --resume to continue it" in err and partial.is_dir()
    # a different recipe is refused, naming what differs, and the partial output stays
    rc = main(["quantize", str(model), *FLAGS, "--bits", "3.5", "--calib", str(calib),
               "--resume", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "differs in recipe.bits (was 3.25, now 3.5)" in err and partial.is_dir()
    assert main(["quantize", str(model), *FLAGS, "--calib", str(calib), "--resume",
                 "--out", str(out)]) == 0
    assert "decoder layers came from the interrupted run" in capsys.readouterr().out
    assert files(out) == files(ref)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # nothing left beside it


def test_interrupt_keeps_the_progress_for_resume(setup, tmp_path, monkeypatch, caplog):
    model, calib, ref = setup
    real = writer_module._crash_point

    def interrupted(event, n):
        if (event, n) == ("unit", 0):
            raise KeyboardInterrupt
        real(event, n)

    monkeypatch.setattr(writer_module, "_crash_point", interrupted)
    out = tmp_path / "ckpt"
    args = ["quantize", str(model), *FLAGS, "--calib", str(calib), "--out", str(out)]
    assert main(args) == 130
    assert "run the same command with --resume to continue" in caplog.text
    monkeypatch.setattr(writer_module, "_crash_point", real)
    assert main([*args, "--resume"]) == 0
    assert files(out) == files(ref)


def test_sharded_checkpoint_is_complete_and_indexed(setup):
    _, _, ref = setup
    shards = sorted(p.name for p in ref.glob("*.safetensors"))
    assert shards == [f"model-0000{k}-of-00005.safetensors" for k in range(1, 6)]
    ckpt = load_checkpoint(ref)  # checksums, index and every layer
    assert ckpt.files["model.embed_tokens.weight"].name == shards[0]
    assert {ckpt.files[f"model.layers.{i}.mlp.down_proj.qweight"].name
            for i in range(4)} == set(shards[1:])
    assert all(p.stat().st_size < 200_000 for p in ref.glob("*.safetensors"))


def test_layers_are_written_and_dropped_as_they_finish(setup, tmp_path, monkeypatch):
    """Nothing of a layer stays in memory once it is written: memory does not grow with the
    number of layers quantized (the RSS measurement is in docs/recipes-and-shards.md)."""
    model, calib, _ = setup
    alive: list[weakref.ref] = []
    add = writer_module.CheckpointWriter.add

    def add_and_check(self, unit):
        gc.collect()
        assert not [r for r in alive if r() is not None], f"unit {unit.index}: earlier alive"
        add(self, unit)
        alive.extend(weakref.ref(t) for t in unit.tensors.values())

    monkeypatch.setattr(writer_module.CheckpointWriter, "add", add_and_check)
    assert main(["quantize", str(model), *FLAGS, "--calib", str(calib), "--low-memory",
                 "--out", str(tmp_path / "q")]) == 0
    assert len(alive) > 100
