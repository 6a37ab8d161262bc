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
    assert main(["demo", "--work", str(tmp_path), "--bits", "3.5", "--nsamples", "4",
                 "--seqlen", "64", "--max-new-tokens", "3", "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert f"reusing {state.model_dir}" in out
    assert (state.ckpt_dir / "config.json").is_file()
    assert re.search(r"avg bits +3\.[3-6]\d\d", out)  # 7 whole-linear blocks: coarse
    assert "original: 'The capital of France is" in out
    assert "sfmp 3.5: 'The capital of France is" in out


def test_quiet_unless_verbose(tmp_path, monkeypatch):
    """Quiet: sfmp's INFO and transformers' notices off while the steps run (restored after),
    vLLM's log to WORK/vllm.log; --verbose: both shown."""
    import logging
    import subprocess

    from transformers.utils import logging as hf_logging

    seen, commands = [], []

    def probe(state):
        seen.append((logging.getLogger().getEffectiveLevel(), hf_logging.get_verbosity()))
        demo.step_serve(state)

    class ExitedAtOnce:  # `sfmp serve` failing before it is healthy
        returncode = 1

        def __init__(self, command):
            commands.append(command)

        def poll(self):
            return 1

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(demo, "STEPS", [("probe", probe)])
    monkeypatch.setattr(subprocess, "Popen", ExitedAtOnce)
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)  # as `sfmp` configures it
    before = logging.INFO, hf_logging.get_verbosity()
    try:
        for extra in ([], ["--verbose"]):
            assert main(["demo", "--work", str(tmp_path), *extra]) == 2  # serve step failed
    finally:
        logging.getLogger().setLevel(root_level)
    assert seen[0] == (logging.WARNING, hf_logging.ERROR)
    assert seen[1] == before  # --verbose changes nothing
    assert hf_logging.get_verbosity() == before[1]
    assert commands[0][-2:] == ["--log-file", str(tmp_path / "vllm.log")]
    assert commands[1][-1] == "--verbose"
