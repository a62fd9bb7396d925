"""Read what the validator needs from a checkpoint directory: the JSON configs, every safetensors
header, and (on request) the values of single tensors. Nothing else is read; the directory's name
does not matter (an export still in its temporary directory validates like the final one).

Value tests work on the raw bits (``uint8`` / ``uint16`` views), so a 30B checkpoint's block scales
are scanned at memory speed and F8 tensors need no float conversion.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.errors import CheckpointError
from jaxquant.io.safetensors import CheckpointFiles, TensorInfo

_CHUNK = 1 << 24  # elements per slice when scanning large tensors


class Unreadable(CheckpointError):
    """The checkpoint cannot be read at all; ``key`` names the file."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint directory opened for validation.

    ``config``: config.json; ``hf_quant``: hf_quant_config.json (``None`` when absent);
    ``infos``: every tensor's header entry by name.
    """

    directory: Path
    config: dict[str, Any]
    hf_quant: dict[str, Any] | None
    files: CheckpointFiles
    infos: dict[str, TensorInfo]

    def text_config(self, key: str, default=None):
        """``config[key]``, else ``config["text_config"][key]`` (multimodal checkpoints), else default."""
        if key in self.config:
            return self.config[key]
        tc = self.config.get("text_config")
        if isinstance(tc, dict) and key in tc:
            return tc[key]
        return default

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` (a read-only view of the mapped file)."""
        return self.files.get(name)


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Unreadable(path.name, f"not valid JSON ({e}). Re-download or re-export the checkpoint.") from None
    if not isinstance(value, dict):
        raise Unreadable(path.name, "is not a JSON object. Re-download or re-export the checkpoint.")
    return value


def open_checkpoint(directory) -> Checkpoint:
    """Open ``directory`` (config.json, hf_quant_config.json if present, safetensors headers).

    Raises:
      Unreadable: no directory, no/invalid config.json, an invalid hf_quant_config.json, no
        safetensors files, or a corrupt/truncated safetensors header or index.
    """
    d = Path(directory)
    if not d.is_dir():
        raise Unreadable(str(d), "not a directory. Pass the checkpoint directory (config.json + *.safetensors).")
    if not (d / "config.json").is_file():
        raise Unreadable("config.json", f"missing from {d}. A Hugging Face checkpoint needs its config.json.")
    config = _json(d / "config.json")
    hq_path = d / "hf_quant_config.json"
    hf_quant = _json(hq_path) if hq_path.is_file() else None
    try:
        files = CheckpointFiles.open(d)
    except CheckpointError as e:
        raise Unreadable("model.safetensors", str(e)) from None
    infos = {name: files.tensor_info(name) for name in files}
    return Checkpoint(d, config, hf_quant, files, infos)


# ----------------------------------------------------------------------------------------------- value tests
def _slices(a: np.ndarray):
    flat = a.reshape(-1)
    for i in range(0, flat.size, _CHUNK):
        yield flat[i:i + _CHUNK]


def scan(a: np.ndarray, tag: str) -> tuple[int, int, int]:
    """``(nonfinite, negative, zero)`` element counts of a tensor with safetensors dtype ``tag``.

    Negative zero counts as zero. Integer tags (``U8`` NVFP4 nibbles) have none of the three.
    ``F8_E8M0`` (MXFP8 block scales): 0xFF is NaN; it has no sign and no zero.
    """
    nonfinite = negative = zero = 0
    if tag == "F32" and a.size <= 8:  # per-tensor scales: plain floats are faster than ufuncs
        for x in np.asarray(a).reshape(-1).tolist():
            if not math.isfinite(x):
                nonfinite += 1
            elif x < 0:
                negative += 1
            elif x == 0:
                zero += 1
        return nonfinite, negative, zero
    for s in _slices(np.asarray(a)):
        if tag == "F8_E4M3":  # e4m3fn: S.1111.111 is NaN, no Inf
            b = s.view(np.uint8)
            mag = b & 0x7F
            nonfinite += int(np.count_nonzero(mag == 0x7F))
            negative += int(np.count_nonzero((b & 0x80).astype(bool) & (mag != 0) & (mag != 0x7F)))
            zero += int(np.count_nonzero(mag == 0))
        elif tag == "F8_E5M2":
            b = s.view(np.uint8)
            mag = b & 0x7F
            nonfinite += int(np.count_nonzero(mag >= 0x7C))
            negative += int(np.count_nonzero((b & 0x80).astype(bool) & (mag != 0) & (mag < 0x7C)))
            zero += int(np.count_nonzero(mag == 0))
        elif tag == "F8_E8M0":
            nonfinite += int(np.count_nonzero(s.view(np.uint8) == 0xFF))
        elif tag in ("BF16", "F16"):
            b = s.view(np.uint16)
            exp_mask = 0x7F80 if tag == "BF16" else 0x7C00
            mag = b & 0x7FFF
            nonfinite += int(np.count_nonzero((b & exp_mask) == exp_mask))
            negative += int(np.count_nonzero((b & 0x8000).astype(bool) & (mag != 0) & ((b & exp_mask) != exp_mask)))
            zero += int(np.count_nonzero(mag == 0))
        elif tag in ("F32", "F64"):
            f = s.astype(np.float64, copy=False)
            fin = np.isfinite(f)
            nonfinite += int(f.size - np.count_nonzero(fin))
            negative += int(np.count_nonzero(fin & (f < 0)))
            zero += int(np.count_nonzero(f == 0))
    return nonfinite, negative, zero
