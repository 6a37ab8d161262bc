"""Plain transformers refuses an SFMP checkpoint, saying what to import; with sfmp_serve.hf
imported the same call loads it; checkpoints written before the guard still load.

Without the guard, transformers 5 ignores the unknown quant_method and builds the model with
random linears, after a warning. The subprocess starts without sfmp_serve imported (the
registry is global to a process), as a user's script would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sfmp_serve.format import TRANSFORMERS_GUARD, TRANSFORMERS_GUARD_KEY
from sfmp_serve.hf import SFMPLinear, load_sfmp_model

IDS = [[0, 5, 17, 99, 250, 3, 42, 7, 300, 11]]

USER_SCRIPT = r"""
import json, sys
from transformers import AutoModelForCausalLM
path, ids = sys.argv[1], json.loads(sys.argv[2])
try:
    AutoModelForCausalLM.from_pretrained(path)
    print("PLAIN loaded")
except Exception as e:
    print("PLAIN", type(e).__name__, " ".join(str(e).split()))
try:
    from lm_eval.models.huggingface import HFLM
except ImportError:
    print("LM_EVAL not installed")
else:
    try:
        HFLM(pretrained=path, device="cpu")
        print("LM_EVAL loaded")
    except Exception as e:
        print("LM_EVAL", type(e).__name__, " ".join(str(e).split()))
import torch
import sfmp_serve.hf
model = AutoModelForCausalLM.from_pretrained(path)
with torch.no_grad():
    print("LOGITS", json.dumps(model(torch.tensor(ids)).logits[0].tolist()))
"""


def _run_user_script(path) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(path), json.dumps(IDS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines()
                if line.split(" ", 1)[0] in ("PLAIN", "LM_EVAL", "LOGITS"))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0]


def test_config_json_carries_the_guard(llama_ckpt):
    config = json.loads((llama_ckpt.path / "config.json").read_text())
    assert config[TRANSFORMERS_GUARD_KEY] == TRANSFORMERS_GUARD
    assert "import sfmp_serve.hf" in TRANSFORMERS_GUARD
    assert not TRANSFORMERS_GUARD.endswith((".safetensors", ".safetensors.index.json"))


def test_plain_transformers_fails_loudly_and_the_integration_loads(llama_ckpt):
    seen = _run_user_script(llama_ckpt.path)
    assert seen["PLAIN"].startswith("ValueError ") and TRANSFORMERS_GUARD in seen["PLAIN"]
    if seen["LM_EVAL"] != "not installed":  # lm-eval refuses the unknown method itself
        assert seen["LM_EVAL"].startswith("ValueError ") and "sfmp" in seen["LM_EVAL"]
    # with `import sfmp_serve.hf`, the same call gives the checkpoint's model
    expected = _logits(load_sfmp_model(llama_ckpt.path))
    torch.testing.assert_close(torch.tensor(json.loads(seen["LOGITS"])), expected,
                               rtol=1e-5, atol=1e-5)


def test_the_loaded_config_drops_the_guard(llama_ckpt):
    model = AutoModelForCausalLM.from_pretrained(llama_ckpt.path)
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), SFMPLinear)
    assert TRANSFORMERS_GUARD_KEY not in model.config.to_dict()


@pytest.fixture()
def unguarded(llama_ckpt, tmp_path):
    """The checkpoint as sfmp-serve wrote it before the guard: no key in config.json."""
    out = Path(shutil.copytree(llama_ckpt.path, tmp_path / "old"))
    config = json.loads((out / "config.json").read_text())
    del config[TRANSFORMERS_GUARD_KEY]
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_checkpoint_without_the_guard_still_loads(llama_ckpt, unguarded):
    expected = _logits(load_sfmp_model(llama_ckpt.path))
    assert torch.equal(_logits(load_sfmp_model(unguarded)), expected)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(unguarded)), expected)
