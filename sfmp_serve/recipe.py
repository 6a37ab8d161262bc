"""The quantization recipe: everything that decides a checkpoint's tensors, as typed data.

A recipe is what `sfmp quantize`'s flags say, as a versioned document (YAML on disk, as
llm-compressor's recipes are): the target (bits or a size budget), the allocation levels and
block shape, the method with its hyper-parameters (the quantizer's Config dataclass), the
calibration data, and per-linear overrides. Every key is checked on load and an unknown one is
refused with its name, so a typo fails at once instead of quietly using a default. Each
checkpoint stores the recipe that made it, all defaults written out (CKPT/recipe.yaml), and
`sfmp quantize MODEL --recipe CKPT/recipe.yaml` makes the same tensors again. How a run
executes (device, --low-memory, shard size, resume) is not part of it.

    version: 1
    bits: 3.25                    # average code bits; or budget_gb: 0.1 (exactly one of them)
    levels: 2                     # 2: floor/ceil of the target; 3: three widths
    bit_choices: null             # or e.g. [2, 3, 4]
    policy: perturbation          # block ranking: perturbation (FGMP) or salience
    tp_shards: null               # tensor-parallel ranges: null = the largest <= 8 the model
                                  # takes; 1 = none (docs/multi-gpu.md)
    uniform: false                # plain baseline: no salience, one integer width
    block: {group_size: 128, rows: 512}
    method: {name: gptq, args: {percdamp: 0.01, blocksize: 128, damp_retries: 3, clip: fisher}}
    calibration: {source: /data/calib.txt, nsamples: 32, seqlen: 256, seed: 0}
    overrides:
      ignore: ['model\\.layers\\.0\\.']       # regexes (re.search on the full linear name):
      pin: {'mlp\\.down_proj$': 4}            # left unquantized / a fixed width

Loading checks types and names only; ranges and combinations are checked by `validate`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from sfmp_serve.errors import SFMPError

if TYPE_CHECKING:  # the pipeline imports torch; this module stays light
    from offline.pipeline import QuantizeOptions

RECIPE_VERSION = 1
RECIPE_FILE = "recipe.yaml"  # the name a checkpoint stores its recipe under
MAX_BITS = 8  # sfmp_serve.format.MAX_BITS (not imported: this module stays free of torch)
# The method when none is named: the best measured on the embedded model (docs/results.md,
# quality v2: GPTQ with Fisher-weighted clipping).
DEFAULT_METHOD = "gptq"
DEFAULT_POLICY = "perturbation"  # the block ranking, by the same measurements


def _fail(where: str, key: str, why: str) -> SFMPError:
    return SFMPError(f"{where}: {key}: {why}")


def _check_keys(data: Any, known: tuple[str, ...], where: str, key: str) -> Mapping[str, Any]:
    """`data` is a mapping whose keys are all in `known`; the first unknown one is named."""
    if not isinstance(data, Mapping):
        raise _fail(where, key or "recipe", f"expected a mapping, got {type(data).__name__}")
    for k in data:
        if k not in known:
            name = f"{key}.{k}" if key else str(k)
            raise _fail(where, name, f"unknown key (known: {', '.join(known)})")
    return data


def _typed(value: Any, kind: type, where: str, key: str, optional: bool = False) -> Any:
    """`value` as `kind` (int, float, bool, str); a float key accepts an integer."""
    if value is None and optional:
        return None
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, kind))
    if not ok:
        want = {int: "an integer", float: "a number", bool: "true or false",
                str: "a string"}[kind] + (" or null" if optional else "")
        raise _fail(where, key, f"expected {want}, got {value!r}")
    return float(value) if kind is float else value


def _regex(pattern: Any, where: str, key: str) -> str:
    pattern = _typed(pattern, str, where, key)
    try:
        re.compile(pattern)
    except re.error as e:
        raise _fail(where, key, f"{pattern!r} is not a regular expression ({e})") from e
    return pattern


@dataclass(frozen=True)
class Block:
    """A block is `rows` outputs x `group_size` inputs; each gets its own bit-width."""

    group_size: int = 128
    rows: int = 512

    @classmethod
    def from_dict(cls, data: Any, where: str, key: str = "block") -> "Block":
        data = _check_keys(data, ("group_size", "rows"), where, key)
        return cls(**{k: _typed(v, int, where, f"{key}.{k}") for k, v in data.items()})


@dataclass(frozen=True)
class Method:
    """A registered quantizer (offline/quantizers) and the fields of its Config dataclass;
    missing fields take the Config's defaults (`resolved` writes them out)."""

    name: str = DEFAULT_METHOD
    args: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str, key: str = "method") -> "Method":
        if isinstance(data, str):  # `method: gptq` for a method with default arguments
            return cls(data)
        data = _check_keys(data, ("name", "args"), where, key)
        args = data.get("args") or {}
        if not isinstance(args, Mapping):
            raise _fail(where, f"{key}.args", f"expected a mapping, got {args!r}")
        return cls(_typed(data.get("name", DEFAULT_METHOD), str, where, f"{key}.name"), dict(args))


@dataclass(frozen=True)
class Calibration:
    """Calibration text: a .txt/.jsonl/.parquet file, hf:NAME[:CONFIG[:SPLIT]], or null for
    data-free sampling from the model; `nsamples` windows of `seqlen` tokens, seeded."""

    source: str | None = None
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Any, where: str, key: str = "calibration") -> "Calibration":
        data = _check_keys(data, ("source", "nsamples", "seqlen", "seed"), where, key)
        values = {k: _typed(v, int, where, f"{key}.{k}") for k, v in data.items()
                  if k != "source"}
        if "source" in data:
            values["source"] = _typed(data["source"], str, where, f"{key}.source", True)
        return cls(**values)


@dataclass(frozen=True)
class Overrides:
    """Per-linear exceptions, by regular expression on the full linear name (re.search):
    `ignore` leaves a linear in its original dtype; `pin` gives every block of it a fixed
    width, counted in the average (the free blocks make up the difference)."""

    ignore: tuple[str, ...] = ()
    pin: tuple[tuple[str, int], ...] = ()  # (pattern, bits), in order

    @classmethod
    def from_dict(cls, data: Any, where: str, key: str = "overrides") -> "Overrides":
        data = _check_keys(data, ("ignore", "pin"), where, key)
        ignore = data.get("ignore") or []
        if isinstance(ignore, str) or not isinstance(ignore, (list, tuple)):
            raise _fail(where, f"{key}.ignore", f"expected a list of regexes, got {ignore!r}")
        pin = data.get("pin") or {}
        if isinstance(pin, Mapping):
            pairs = list(pin.items())
        elif isinstance(pin, (list, tuple)):
            pairs = list(pin)
        else:
            raise _fail(where, f"{key}.pin", f"expected a mapping regex: bits, got {pin!r}")
        out = []
        for item in pairs:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise _fail(where, f"{key}.pin", f"expected regex: bits pairs, got {item!r}")
            pattern = _regex(item[0], where, f"{key}.pin")
            out.append((pattern, _typed(item[1], int, where, f"{key}.pin[{pattern!r}]")))
        return cls(tuple(_regex(p, where, f"{key}.ignore[{i}]") for i, p in enumerate(ignore)),
                   tuple(out))


_SECTIONS = {"block": Block, "method": Method, "calibration": Calibration,
             "overrides": Overrides}
_SCALARS = {"bits": (float, True), "budget_gb": (float, True), "levels": (int, False),
            "uniform": (bool, False), "policy": (str, False), "tp_shards": (int, True)}


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model (module docstring). Sections may be given as dicts or, for
    `method`, a name: Recipe(bits=3.25, method="gptq", calibration={"source": "c.txt"})."""

    bits: float | None = None
    budget_gb: float | None = None
    levels: int = 2
    bit_choices: tuple[int, ...] | None = None
    uniform: bool = False
    policy: str = DEFAULT_POLICY
    tp_shards: int | None = None
    block: Block = field(default_factory=Block)
    method: Method = field(default_factory=Method)
    calibration: Calibration = field(default_factory=Calibration)
    overrides: Overrides = field(default_factory=Overrides)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        for key, (kind, optional) in _SCALARS.items():
            object.__setattr__(self, key, _typed(getattr(self, key), kind, "recipe", key,
                                                 optional))
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                object.__setattr__(self, name, cls.from_dict(value, "recipe", name))
        if self.bit_choices is not None:
            object.__setattr__(self, "bit_choices", tuple(
                _typed(b, int, "recipe", "bit_choices") for b in self.bit_choices))

    # ---------------------------------------------------------------------------------------
    # Reading and writing
    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        """A recipe from plain data (parsed YAML); SFMPError naming `where` and the key."""
        known = ("version", *_SCALARS, "bit_choices", *_SECTIONS)
        data = _check_keys(data, known, where, "")
        version = _typed(data.get("version", RECIPE_VERSION), int, where, "version")
        if version != RECIPE_VERSION:
            raise _fail(where, "version", f"{version} is not a recipe version this sfmp-serve "
                                          f"reads (it reads {RECIPE_VERSION})")
        values: dict[str, Any] = {"version": version}
        for key, (kind, optional) in _SCALARS.items():
            if key in data:
                values[key] = _typed(data[key], kind, where, key, optional)
        if data.get("bit_choices") is not None:
            choices = data["bit_choices"]
            if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
                raise _fail(where, "bit_choices", f"expected a list of integers, got "
                                                  f"{choices!r}")
            values["bit_choices"] = tuple(_typed(b, int, where, "bit_choices") for b in choices)
        for key, section in _SECTIONS.items():
            if key in data:
                values[key] = section.from_dict(data[key], where, key)
        return cls(**values)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        """A recipe from a YAML file; SFMPError naming the file for anything wrong in it."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise SFMPError(f"{path}: recipe file does not exist") from e
        except (OSError, UnicodeDecodeError) as e:
            raise SFMPError(f"{path}: cannot read the recipe ({e})") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise SFMPError(f"{path}: not valid YAML{line} ({problem})") from e
        recipe = cls.from_dict(data if data is not None else {}, str(path))
        from offline.quantizers.base import method_config  # needs torch: not at import

        method_config(recipe.method.name, recipe.method.args, str(path))  # names the file
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the documented layout (the inverse of from_dict)."""
        return {
            "version": self.version, "bits": self.bits, "budget_gb": self.budget_gb,
            "levels": self.levels,
            "bit_choices": None if self.bit_choices is None else list(self.bit_choices),
            "uniform": self.uniform, "policy": self.policy, "tp_shards": self.tp_shards,
            "block": {"group_size": self.block.group_size, "rows": self.block.rows},
            "method": {"name": self.method.name, "args": dict(self.method.args)},
            "calibration": dataclasses.asdict(self.calibration),
            "overrides": {"ignore": list(self.overrides.ignore),
                          "pin": dict(self.overrides.pin)},
        }

    def dump(self) -> str:
        """The recipe as YAML (the same recipe always gives the same text)."""
        import yaml

        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        return ("# sfmp-serve quantization recipe; make the same checkpoint again with\n"
                "#   sfmp quantize MODEL_DIR --recipe recipe.yaml --out OUT\n" + body)

    def save(self, path: str | os.PathLike) -> Path:
        Path(path).write_text(self.dump(), encoding="utf-8")
        return Path(path)

    # ---------------------------------------------------------------------------------------
    # Checking and completing
    # ---------------------------------------------------------------------------------------
    def resolved(self, where: str = "recipe") -> "Recipe":
        """The recipe with every default written out: the method's full Config (unknown
        arguments refused, each typed as its default), a calibration file as an absolute path.
        What a checkpoint stores, so that it reproduces whatever the defaults become."""
        from offline.quantizers.base import method_config

        config = method_config(self.method.name, self.method.args, where)
        source = self.calibration.source
        if source is not None and not source.startswith("hf:"):
            source = str(Path(source).expanduser().resolve())
        return dataclasses.replace(
            self, method=Method(self.method.name, dataclasses.asdict(config)),
            calibration=dataclasses.replace(self.calibration, source=source))

    def validate(self) -> None:
        """Every check that needs no model: ranges, combinations, the method's arguments."""
        self.options().validate()
        for pattern, bits in self.overrides.pin:
            if not 1 <= bits <= MAX_BITS:
                raise SFMPError(f"--pin {pattern}={bits}: bits must be in 1..{MAX_BITS}")
        if self.overrides.pin and self.uniform:
            raise SFMPError("--pin with --uniform: the uniform baseline has one bit-width for "
                            "every block; drop --uniform to pin some linears")

    def options(self, device: str = "cpu", low_memory: bool = False,
                salience_cache: str | None = None) -> "QuantizeOptions":
        """The pipeline's QuantizeOptions for this recipe and how to run it."""
        from offline.pipeline import QuantizeOptions

        return QuantizeOptions(
            bits=self.bits, budget_gb=self.budget_gb, levels=self.levels,
            bit_choices=self.bit_choices, group_size=self.block.group_size,
            block_rows=self.block.rows, method=self.method.name,
            method_args=dict(self.method.args), calib=self.calibration.source,
            nsamples=self.calibration.nsamples, seqlen=self.calibration.seqlen,
            seed=self.calibration.seed, device=device, uniform=self.uniform,
            policy=self.policy, tp_shards=self.tp_shards,
            salience_cache=salience_cache, low_memory=low_memory,
            ignore=self.overrides.ignore, pins=self.overrides.pin)

    @classmethod
    def from_options(cls, options: "QuantizeOptions") -> "Recipe":
        """The recipe of a pipeline QuantizeOptions (the inverse of `options`)."""
        return cls(bits=options.bits, budget_gb=options.budget_gb, levels=options.levels,
                   bit_choices=options.bit_choices, uniform=options.uniform,
                   policy=options.policy, tp_shards=options.tp_shards,
                   block=Block(options.group_size, options.block_rows),
                   method=Method(options.method, dict(options.method_args)),
                   calibration=Calibration(options.calib, options.nsamples, options.seqlen,
                                           options.seed),
                   overrides=Overrides(tuple(options.ignore), tuple(options.pins)))


def as_recipe(recipe: "Recipe | str | os.PathLike | Mapping[str, Any]") -> Recipe:
    """A Recipe from a Recipe, a YAML file path, or a mapping in the recipe layout."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.load(recipe)
    raise SFMPError(f"recipe: expected a Recipe, a YAML file or a mapping, got "
                    f"{type(recipe).__name__}")
