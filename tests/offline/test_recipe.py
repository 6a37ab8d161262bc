"""Recipes: typed and versioned, unknown keys refused by name, stored in every checkpoint, and
a stored recipe makes the same checkpoint again (CLI flags, recipe file and Python API alike)."""

import re

import pytest
import yaml

import sfmp_serve
from sfmp_serve.cli.main import main
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import load_checkpoint
from sfmp_serve.recipe import RECIPE_FILE, Recipe
from tests.tiny import CORPUS

FLAGS = ["--bits", "3.25", "--method", "gptq", "--method-arg", "percdamp=0.05",
         "--group-size", "32", "--block-rows", "16", "--nsamples", "4", "--seqlen", "64",
         "--pin", "down_proj=4", "--ignore", r"layers\.1\.mlp\.(gate|up)_proj"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(CORPUS))
    return path


def weights_bytes(ckpt):
    return {f.name: f.read_bytes() for f in sorted(ckpt.glob("*.safetensors*"))}


def one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("sfmp quantize: error: "), err
    return err[-1]


def test_round_trip_keeps_every_field(tmp_path):
    recipe = Recipe(bits=3.25, levels=3, bit_choices=(2, 3, 4), policy="perturbation",
                    block={"group_size": 64},
                    method={"name": "awq", "args": {"grid": 5}},
                    calibration={"source": "hf:wikitext:wikitext-2-raw-v1", "nsamples": 8},
                    overrides={"ignore": ["^lm"], "pin": {r"down_proj$": 5, "o_proj": 2}})
    loaded = Recipe.load(recipe.save(tmp_path / "r.yaml"))
    assert loaded == recipe and Recipe.from_dict(recipe.to_dict()) == recipe
    assert loaded.overrides.pin == ((r"down_proj$", 5), ("o_proj", 2))  # order kept
    full = recipe.resolved()
    assert full.method.args == {"grid": 5, "clip_grid": 20, "max_shrink": 0.5}
    assert full.dump() == Recipe.load(Recipe(**vars(full)).save(tmp_path / "f.yaml")).dump()


@pytest.mark.parametrize("text,match", [
    ("bitz: 3\n", r"r.yaml: bitz: unknown key \(known: version, bits,"),
    ("bits: 3\ncalibration: {nsample: 4}\n", "calibration.nsample: unknown key"),
    ("bits: 3\nmethod: {name: gptq, args: {percdampp: 0.1}}\n",
     r"r.yaml: method.args.percdampp: unknown argument of method gptq \(it takes: percdamp,"),
    ("bits: three\n", "bits: expected a number or null, got 'three'"),
    ("bits: 3\nuniform: 1\n", "uniform: expected true or false"),
    ("bits: 3\npolicy: fisher\n", "--policy='fisher': expected one of salience, perturbation"),
    ("bits: 3\nmethod: {name: rtn, args: {clip: mse}}\n",
     "method.args.clip='mse': expected one of minmax, fisher"),
    ("bits: 3\nmethod: {name: gptq, args: {blocksize: 1.5}}\n",
     r"method.args.blocksize: expected a int \(default 128\), got 1.5"),
    ("version: 2\nbits: 3\n", "version: 2 is not a recipe version this sfmp-serve reads"),
    ("bits: [3\n", r"not valid YAML at line 2"),
    ("bits: 3\noverrides: {pin: {down: 9}}\n", "--pin down=9: bits must be in 1..8"),
    ("bits: 3\nmethod: {name: awq, args: {max_shrink: 2}}\n", "max_shrink=2.0: must be in"),
])
def test_bad_recipe_is_one_line_naming_file_and_key(tmp_path, capsys, tiny_llama, text, match):
    (tmp_path / "r.yaml").write_text(text)
    out = tmp_path / "out"
    rc = main(["quantize", str(tiny_llama), "--recipe", str(tmp_path / "r.yaml"),
               "--out", str(out)])
    assert re.search(match, one_line_error(capsys, rc))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_flags_recipe_file_and_api_make_the_same_checkpoint(tmp_path, tiny_llama, calib):
    first = tmp_path / "first"
    assert main(["quantize", str(tiny_llama), *FLAGS, "--calib", str(calib),
                 "--out", str(first)]) == 0
    recipe = Recipe.load(first / RECIPE_FILE)
    assert recipe.method.args == {"percdamp": 0.05, "blocksize": 128, "damp_retries": 3,
                                  "clip": "fisher"}
    assert recipe.calibration.source == str(calib.resolve())
    assert recipe.overrides.pin == (("down_proj", 4),) and len(recipe.overrides.ignore) == 1
    ckpt = load_checkpoint(first)
    assert ckpt.config.method_args["percdamp"] == 0.05
    # the stored recipe reproduces the tensors, and so does the Python API
    again = tmp_path / "again"
    assert main(["quantize", str(tiny_llama), "--recipe", str(first / RECIPE_FILE),
                 "--out", str(again)]) == 0
    api = tmp_path / "api"
    summary = sfmp_serve.quantize(tiny_llama, yaml.safe_load((first / RECIPE_FILE).read_text()),
                                  out=api)
    assert summary.path == api and summary.ignored == 2 and summary.shards == 1
    for other in (again, api):
        assert weights_bytes(other) == weights_bytes(first)
        assert (other / "config.json").read_bytes() == (first / "config.json").read_bytes()
        assert (other / RECIPE_FILE).read_bytes() == (first / RECIPE_FILE).read_bytes()
    # a flag given with --recipe replaces that value only
    four = tmp_path / "four"
    assert main(["quantize", str(tiny_llama), "--recipe", str(first / RECIPE_FILE),
                 "--bits", "4", "--pin", "down_proj=5", "--out", str(four)]) == 0
    changed = Recipe.load(four / RECIPE_FILE)
    assert changed.bits == 4 and changed.overrides.pin == (("down_proj", 5),)
    assert changed.method == recipe.method and changed.overrides.ignore == recipe.overrides.ignore


def test_python_api_takes_a_recipe_object(tmp_path, tiny_llama):
    recipe = sfmp_serve.Recipe(bits=2.5, block={"group_size": 32, "rows": 16},
                               calibration={"nsamples": 4, "seqlen": 64})
    summary = sfmp_serve.quantize(tiny_llama, recipe, out=tmp_path / "q",
                                  metrics={"toy perplexity": 12.5})
    assert abs(summary.avg_bits - 2.5) <= 0.01 and summary.bit_choices == (2, 3)
    assert Recipe.load(tmp_path / "q" / RECIPE_FILE) == recipe.resolved()
    with pytest.raises(SFMPError, match="output directory exists"):
        sfmp_serve.quantize(tiny_llama, recipe, out=tmp_path / "q")
    with pytest.raises(SFMPError, match=r"recipe: calibration.nsamples: expected an integer"):
        sfmp_serve.Recipe(bits=3, calibration={"nsamples": "2"})


def test_model_card_says_what_it_is_and_how_to_run_it(tmp_path, tiny_llama):
    out = tmp_path / "tiny-sfmp"
    assert main(["quantize", str(tiny_llama), "--bits", "3.5", "--group-size", "32",
                 "--block-rows", "16", "--nsamples", "4", "--seqlen", "64",
                 "--card-metric", "toy ppl=9.87", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    cfg = load_checkpoint(out).config
    for text in (f"{cfg.avg_bits:.4f} average code bits", "(target 3.5)", "| toy ppl | 9.87 |",
                 f"{cfg.bits_per_weight:.4f}", "MB in 1 file", "`gptq`",
                 "vllm serve ./tiny-sfmp --quantization sfmp", "sfmp serve ./tiny-sfmp",
                 "import sfmp_serve.hf",
                 'AutoModelForCausalLM.from_pretrained("./tiny-sfmp")',
                 "--recipe tiny-sfmp/recipe.yaml", (out / RECIPE_FILE).read_text().strip()):
        assert text in card, text
    assert card.startswith("---\nbase_model: ")
