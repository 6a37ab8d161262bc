"""Damage copies of checkpoints the ways disks, copies, tools and people do.

`resigned_copy` rewrites tensors and records fresh checksums: the damage a buggy writer would
make, which only the structural checks can catch. The byte-level helpers change the file as
corruption does, leaving the recorded checksums as they were.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from sfmp_serve.format import WEIGHTS_FILE, WEIGHTS_METADATA
from sfmp_serve.weights_file import write_weights


def resigned_copy(checkpoint: Path, out: Path,
                  edit: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
    """A copy of `checkpoint` whose tensors `edit` changed in place, with valid checksums."""
    shutil.copytree(checkpoint, out)
    tensors = load_file(str(out / WEIGHTS_FILE))
    edit(tensors)
    write_weights(out / WEIGHTS_FILE, tensors, WEIGHTS_METADATA)
    return out


def edit_config(checkpoint: Path, quantization: bool = True, **changes: Any) -> None:
    """Change keys of config.json (of its quantization_config by default) in place."""
    cfg_file = checkpoint / "config.json"
    cfg = json.loads(cfg_file.read_text())
    (cfg["quantization_config"] if quantization else cfg).update(changes)
    cfg_file.write_text(json.dumps(cfg))


def header(file: Path) -> tuple[dict, int]:
    """(the safetensors header as JSON, offset of the first data byte)."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), 8 + length


def edit_header(file: Path, edit: Callable[[dict], Any]) -> None:
    """Rewrite the header JSON (edited in place by `edit`), keeping the data bytes as they are."""
    head, start = header(file)
    edit(head)
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = file.read_bytes()[start:]
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def flip_byte(file: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= mask
    file.write_bytes(bytes(data))


def data_offset(file: Path, tensor: str) -> int:
    """File offset of the first byte of `tensor`'s data."""
    head, start = header(file)
    return start + head[tensor]["data_offsets"][0]
