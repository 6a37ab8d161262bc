"""The checkpoint written as the layers finish: shards, a progress manifest, and resume.

A run writes into the temporary directory of sfmp_serve.atomic_dir (renamed into place only
when complete). Everything it needs to continue after a kill lives in `.sfmp-progress/` there:

    manifest.json          what is done: units written, shards closed, bit statistics, and
                           what the run was (recipe, model fingerprint, shard cap, version)
    plan.safetensors       the plan (orders, block bits, calibration tokens): computed once
    part-outside.safetensors, part-00007.safetensors
                           units (everything outside the decoder layers; one decoder layer)
                           written but not yet in a closed shard
    hidden-00007.safetensors
                           the calibration inputs of the next layer (calibrated methods)
    shard-00001.safetensors  closed shards, renamed to their final names at the end

Each unit is packed as its layer finishes, written as a part (fsync), and recorded in the
manifest (written to a new file, fsynced, renamed over the old one); when the parts waiting
would exceed the shard cap with the next unit, they are copied into a shard (chunk by chunk,
every tensor checked against its digest) and deleted. Nothing but the manifest says what is
done: on resume, files it does not name (a part or shard being written at the kill) are
deleted and the run continues at the first unit it lacks. Bytes written never depend on where
a run was interrupted: files are written deterministically (sfmp_serve/weights_file.py), shard
cuts depend only on unit sizes (sfmp_serve/shards.py), and a resumed run reloads the plan and
the hidden states instead of recomputing them. So a resumed run ends byte-identical to an
uninterrupted one.

SFMP_CRASH_AT=EVENT:N (a test hook) kills the process with SIGKILL at a chosen point: after
unit N's part is written (`part`), after shard N is assembled (`shard`), or after unit N is
recorded (`unit`; N = -1 is the unit outside the layers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from offline import allocation as alloc
from offline.export import Unit
from offline.overrides import Selection
from offline.pipeline import Plan
from offline.reorder import Order
from sfmp_serve import __version__
from sfmp_serve.atomic_dir import RESUMABLE, fsync_dir
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import (WEIGHTS_METADATA, BitStats, LayerGeometry, SFMPConfig,
                               write_config)
from sfmp_serve.shards import closes_before, shard_names, write_index
from sfmp_serve.weights_file import (copy_weights, read_header, read_weights, tensor_refs,
                                     write_weights)

log = logging.getLogger(__name__)

PROGRESS = ".sfmp-progress"
MANIFEST = "manifest.json"
PLAN = "plan.safetensors"
MANIFEST_VERSION = 1
CRASH_ENV = "SFMP_CRASH_AT"
_TOKENS = "__calibration_tokens__"
_FISHER = "fisher"  # <target>.fisher: its reordered Fisher diagonal, for clip=fisher


def _crash_point(event: str, n: int) -> None:
    if os.environ.get(CRASH_ENV) == f"{event}:{n}":
        log.warning("%s=%s: killing this process (test hook)", CRASH_ENV, f"{event}:{n}")
        os.kill(os.getpid(), signal.SIGKILL)


def _part(index: int) -> str:
    return "part-outside.safetensors" if index < 0 else f"part-{index:05d}.safetensors"


def model_fingerprint(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What identifies the source model without reading its weights: config.json and every
    safetensors file's size and header (names, dtypes, shapes, offsets)."""
    path = Path(model_dir)
    try:
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                digest.update(f"{f.name}:{f.stat().st_size}:".encode()
                              + handle.read(min(length, 100 << 20)))
    except OSError as e:
        raise SFMPError(f"{path}: cannot read the model directory ({e})") from e
    return {"sha256": digest.hexdigest()}


class CheckpointWriter:
    """Writes the units of one run into `tmp` (an atomic_dir tmp directory) and finishes the
    checkpoint there. `start` begins a run, `reopen` continues an interrupted one."""

    def __init__(self, tmp: Path, manifest: dict[str, Any]) -> None:
        self.tmp = tmp
        self.progress = tmp / PROGRESS
        self.manifest = manifest

    # ---------------------------------------------------------------------------------------
    # Starting and resuming
    # ---------------------------------------------------------------------------------------
    @staticmethod
    def identity(recipe: Mapping[str, Any], model_dir: str | os.PathLike,
                 max_shard_size: int) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one to give the same bytes.
        Not how it runs: the plan is stored, and the layer engine gives the same tensors with
        or without --low-memory, so a run killed for memory may resume with the flag."""
        return {"recipe": json.loads(json.dumps(recipe)), "model": model_fingerprint(model_dir),
                "max_shard_size": max_shard_size, "sfmp_serve": __version__}

    @classmethod
    def start(cls, tmp: Path, identity: Mapping[str, Any], layers: int) -> "CheckpointWriter":
        (tmp / PROGRESS).mkdir()
        writer = cls(tmp, {"version": MANIFEST_VERSION, **identity, "layers": layers,
                           "units": [], "pending": [], "shards": [], "stats": [0, 0, 0],
                           "bytes": 0,
                           "hidden": None, "plan": None})
        return writer

    @staticmethod
    def check(partial: Path, identity: Mapping[str, Any]) -> None:
        """Can this run continue the interrupted one in `partial`? Only reads: a refusal
        leaves the partial output as it was."""
        try:
            manifest = json.loads((partial / PROGRESS / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SFMPError(f"{partial}: cannot read the progress manifest ({e}); delete the "
                            "directory to start over") from e
        if manifest.get("version") != MANIFEST_VERSION:
            raise SFMPError(f"{partial}: progress manifest version {manifest.get('version')!r}, "
                            f"this sfmp-serve writes {MANIFEST_VERSION}; delete it to start over")
        for key, value in identity.items():
            if manifest.get(key) != value:
                raise SFMPError(f"--resume: the interrupted run in {partial.name} differs in "
                                f"{_difference(key, manifest.get(key), value)}; run it with "
                                "the same model, recipe and shard size, or delete it to start "
                                "over")

    @classmethod
    def reopen(cls, tmp: Path, identity: Mapping[str, Any]) -> "CheckpointWriter":
        """The interrupted run in `tmp` (checked against this run's identity), with every
        file the manifest does not name removed."""
        cls.check(tmp, identity)
        writer = cls(tmp, json.loads((tmp / PROGRESS / MANIFEST).read_text(encoding="utf-8")))
        writer._clean()
        log.info("resuming %s: %s", tmp.name, writer.state())
        return writer

    def _referenced(self) -> set[str]:
        names = {MANIFEST, PLAN} | {_part(i) for i, _ in self.manifest["pending"]}
        names |= {s["file"] for s in self.manifest["shards"]}
        if self.manifest["hidden"]:
            names.add(self.manifest["hidden"])
        return names

    def _clean(self) -> None:
        """Remove what a kill left half-done: files the manifest does not name."""
        keep = self._referenced()
        for entry in self.progress.iterdir():
            if entry.name not in keep:
                entry.unlink()
                log.info("resume: removed %s (written after the last recorded step)",
                         entry.name)
        missing = [n for n in sorted(keep - {PLAN}) if not self._shard_or_file(n).exists()]
        if missing or (self.manifest["plan"] and not (self.progress / PLAN).exists()):
            raise SFMPError(f"{self.progress}: {missing[0] if missing else PLAN} is missing; "
                            "the partial output is damaged: delete it to start over")

    def _shard_or_file(self, name: str) -> Path:
        """A progress file, or a shard already moved to its final place by finish()."""
        path = self.progress / name
        for k, shard in enumerate(self.manifest["shards"]):
            if shard["file"] == name and not path.exists():
                return self.tmp / shard_names(self.total_shards())[k]
        return path

    def total_shards(self) -> int:
        return len(self.manifest["shards"]) + bool(self.manifest["pending"])

    def state(self) -> str:
        layers = [i for i in self.manifest["units"] if i >= 0]
        return (f"{len(layers)} of {self.manifest['layers']} layers done, "
                f"{len(self.manifest['shards'])} shards closed")

    # ---------------------------------------------------------------------------------------
    # Plan
    # ---------------------------------------------------------------------------------------
    def save_plan(self, plan: Plan) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name in plan.geos:
            tensors[f"{name}.input_perm"] = plan.orders[name].input_perm.to(torch.int32)
            tensors[f"{name}.output_perm"] = plan.orders[name].output_perm.to(torch.int32)
            tensors[f"{name}.block_bits"] = plan.allocation.block_bits[name]
        if plan.tokens is not None:
            tensors[_TOKENS] = plan.tokens.cpu()
        for name, fisher in (plan.fisher or {}).items():
            tensors[f"{name}.{_FISHER}"] = fisher
        write_weights(self.progress / PLAN, tensors, WEIGHTS_METADATA, sync=True)
        a = plan.allocation
        self.manifest["plan"] = {
            "avg_bits": a.avg_bits, "target_bits": a.target_bits,
            "bit_choices": list(a.bit_choices), "quantized": list(plan.selection.quantized),
            "ignored": list(plan.selection.ignored), "pinned": plan.selection.pinned,
            "config": plan.config.to_dict()}
        self._commit()
        (self.tmp / RESUMABLE).write_text(self.state() + "\n")

    def load_plan(self, geos: Mapping[str, LayerGeometry]) -> Plan | None:
        """The stored plan (None if the run was killed before it was stored); `geos` of every
        target, from the model."""
        meta = self.manifest["plan"]
        if meta is None:
            return None
        tensors, _ = read_weights(self.progress / PLAN, required=True, verify=True)
        names = tuple(meta["quantized"])
        orders = {n: Order(tensors[f"{n}.input_perm"], tensors[f"{n}.output_perm"])
                  for n in names}
        block_bits = {n: tensors[f"{n}.block_bits"] for n in names}
        allocation = alloc.Allocation(block_bits, meta["avg_bits"], meta["target_bits"],
                                      tuple(meta["bit_choices"]))
        selection = Selection(names, tuple(meta["ignored"]), dict(meta["pinned"]))
        fisher = ({n: tensors[f"{n}.{_FISHER}"] for n in names}
                  if f"{names[0]}.{_FISHER}" in tensors else None) if names else None
        return Plan(selection, {n: geos[n] for n in names}, orders, allocation,
                    tensors.get(_TOKENS), SFMPConfig.from_dict(meta["config"]), fisher)

    # ---------------------------------------------------------------------------------------
    # Units
    # ---------------------------------------------------------------------------------------
    def done(self) -> set[int]:
        return set(self.manifest["units"])

    def hidden(self) -> list[torch.Tensor] | None:
        """The calibration inputs of the first layer not done (calibrated methods)."""
        name = self.manifest["hidden"]
        if name is None:
            return None
        tensors, _ = read_weights(self.progress / name, required=True, verify=True)
        return [tensors[f"h.{i}"] for i in range(len(tensors))]

    def stats(self) -> BitStats:
        return BitStats(*self.manifest["stats"])

    def nbytes(self) -> int:
        """Tensor bytes written so far (all of them once every unit is added)."""
        return self.manifest["bytes"]

    def add(self, unit: Unit) -> None:
        """Write one unit durably, closing a shard first when it would overflow the cap."""
        size = sum(t.numel() * t.element_size() for t in unit.tensors.values())
        write_weights(self.progress / _part(unit.index), unit.tensors, WEIGHTS_METADATA,
                      sync=True)
        _crash_point("part", unit.index)
        merged = []
        pending = sum(n for _, n in self.manifest["pending"])
        if closes_before(pending, size, self.manifest["max_shard_size"]):
            merged = self._close_shard()
        old_hidden = self.manifest["hidden"]
        if unit.hidden is not None:
            self.manifest["hidden"] = f"hidden-{unit.index:05d}.safetensors"
            write_weights(self.progress / self.manifest["hidden"],
                          {f"h.{i}": h.cpu() for i, h in enumerate(unit.hidden)},
                          WEIGHTS_METADATA, sync=True)
        self.manifest["pending"].append([unit.index, size])
        self.manifest["units"].append(unit.index)
        self.manifest["stats"] = list(dataclasses.astuple(unit.add_to(self.stats())))
        self.manifest["bytes"] += size
        self._commit()
        for name in merged + ([old_hidden] if old_hidden not in (None,
                                                                 self.manifest["hidden"])
                              else []):
            (self.progress / name).unlink()
        (self.tmp / RESUMABLE).write_text(self.state() + "\n")
        _crash_point("unit", unit.index)

    def _close_shard(self) -> list[str]:
        """Copy the pending parts into the next shard; returns the parts (deleted once the
        manifest no longer names them)."""
        parts = [_part(i) for i, _ in self.manifest["pending"]]
        refs, digests = [], {}
        for name in parts:
            part_refs, part_digests = tensor_refs(self.progress / name)
            refs += part_refs.values()
            digests.update(part_digests)
        number = len(self.manifest["shards"]) + 1
        shard = f"shard-{number:05d}.safetensors"
        copy_weights(self.progress / shard, refs, digests, WEIGHTS_METADATA, sync=True)
        _crash_point("shard", number)
        self.manifest["shards"].append(
            {"file": shard, "units": [i for i, _ in self.manifest["pending"]]})
        self.manifest["pending"] = []
        return parts

    def _commit(self) -> None:
        """Replace the manifest atomically and durably: it is the only record of progress."""
        path = self.progress / MANIFEST
        tmp = path.with_name(MANIFEST + ".new")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.progress)

    # ---------------------------------------------------------------------------------------
    # Finishing
    # ---------------------------------------------------------------------------------------
    def finish(self, hf_config: Mapping[str, Any], config: SFMPConfig,
               copy_files: Iterable[Path], text_files: Mapping[str, str]) -> int:
        """The last shard, final shard names, the index, config.json and the other files; the
        progress directory goes. Returns the number of shards."""
        if self.manifest["pending"]:
            merged = self._close_shard()
            self._commit()
            for name in merged:
                (self.progress / name).unlink()
        shards = self.manifest["shards"]
        names = shard_names(len(shards))
        weight_map, total = {}, 0
        for shard, name in zip(shards, names):
            source = self.progress / shard["file"]
            if source.exists():  # a finish interrupted half-way has moved some already
                os.replace(source, self.tmp / name)
            for key, (dtype, shape) in read_header(self.tmp / name).items():
                weight_map[key] = name
                total += _nbytes(dtype, shape)
        if len(names) > 1:
            write_index(self.tmp, weight_map, total)
        write_config(self.tmp, hf_config, config)
        for f in copy_files:
            shutil.copy2(f, self.tmp / Path(f).name)
        for name, text in text_files.items():
            (self.tmp / name).write_text(text, encoding="utf-8")
        (self.tmp / RESUMABLE).unlink()
        shutil.rmtree(self.progress)
        return len(names)


def _nbytes(dtype: torch.dtype | str, shape: list[int]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch.empty(0, dtype=dtype).element_size()


def _difference(key: str, before: Any, now: Any) -> str:
    """The first differing leaf of two JSON values, for the resume error."""
    if isinstance(before, dict) and isinstance(now, dict):
        for k in sorted(set(before) | set(now)):
            if before.get(k) != now.get(k):
                return _difference(f"{key}.{k}", before.get(k), now.get(k))
    return f"{key} (was {before!r}, now {now!r})"
