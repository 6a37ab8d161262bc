"""sfmp demo, wired end to end on a tiny model placed where the import step would put it."""

import re

from sfmp_serve.cli import demo
from sfmp_serve.cli.main import main
from tests.tiny import make_tiny_model


def test_steps_are_a_list():
    assert [name for name, _ in demo.STEPS] == ["import", "quantize", "inspect", "generate",
                                                "serve"]


def test_demo_on_tiny_model(tmp_path, capsys):
    state = demo.DemoState(tmp_path, 3.5)
    make_tiny_model(state.model_dir, "llama", layers=1)  # "already imported": reused
    assert main(["demo", "--work", str(tmp_path), "--bits", "3.5", "--nsamples", "2",
                 "--seqlen", "16", "--max-new-tokens", "3", "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert f"reusing {state.model_dir}" in out
    assert (state.ckpt_dir / "config.json").is_file()
    assert re.search(r"avg bits +3\.[45]\d\d", out)
    assert "original: 'The capital of France is" in out
    assert "sfmp 3.5: 'The capital of France is" in out
