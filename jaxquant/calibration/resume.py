"""Per-layer checkpoints of a layer-by-layer calibration, so an interrupted run resumes where it stopped.

ModelOpt's ``layerwise: {checkpoint_dir: DIR, save_every: N}``: after every ``N``-th decoder layer (and after the
last one, and after the head) the layerwise driver writes its whole state to ``DIR/layerwise_state.safetensors``:
every stage's quantizer statistics (amax) and every calibration batch's activations between the layers (what the
next layer reads: the hidden states, the carried context, the running "finite" flag). A run started with the same
directory, model, recipe and calibration tokens loads it and continues at the next layer; the statistics come out
the same as an uninterrupted run's, bit for bit (tests/calibration/test_calibration_resume.py). The file is
replaced atomically (``io.safetensors.save_file_atomic``), so a run killed while saving leaves the previous one.

A checkpoint belongs to one run: it records a fingerprint of the calibration tokens, the quantizers' names and
formats, the stages' statistic shapes and the weights' amax (which depend on every weight's values), and a
different run refuses it, naming the directory, instead of resuming from someone else's state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.errors import CheckpointError

log = logging.getLogger("jaxquant.calibration")

FILE_NAME = "layerwise_state.safetensors"
FILE_FORMAT = "jaxquant-layerwise-state"
FILE_VERSION = "1"


def fingerprint(parts_amax: list[list[Any]], data: list[tuple], site_configs: list[tuple[str, str]]) -> str:
    """sha256 hex of what a checkpoint must share with the run that resumes it: ``parts_amax`` (every stage's amax
    leaves before any forward pass: the weights' amax and the activations' initial values), the batches
    ``(index, ids, mask, tokens)`` and ``(quantizer name, config)`` pairs."""
    h = hashlib.sha256()
    for leaves in parts_amax:
        for a in leaves:
            a = np.asarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    for _, ids, mask, _ in data:
        for a in (ids, mask):
            if a is None:
                h.update(b"none")
                continue
            a = np.asarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(site_configs).encode())
    return h.hexdigest()


def _key(k: Any) -> Any:
    """A dict key as JSON (strings, numbers, booleans, None, tuples of those)."""
    if isinstance(k, tuple):
        return {"tuple": [_key(x) for x in k]}
    if k is None or isinstance(k, (str, int, float, bool)):
        return k
    raise TypeError(f"cannot checkpoint a context keyed by {type(k).__name__}")


def _unkey(k: Any) -> Any:
    return tuple(_unkey(x) for x in k["tuple"]) if isinstance(k, dict) else k


def _encode(tree: Any, prefix: str, out: dict[str, Any]) -> Any:
    """A JSON schema of ``tree`` (arrays, None, tuples, lists, dicts); its arrays go to ``out``."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {"dict": [[_key(k), _encode(v, f"{prefix}.{i}", out)] for i, (k, v) in enumerate(tree.items())]}
    if isinstance(tree, (tuple, list)):
        return {type(tree).__name__: [_encode(v, f"{prefix}.{i}", out) for i, v in enumerate(tree)]}
    out[prefix] = tree
    return {"t": prefix}


def _decode(schema: Any, tensors: dict[str, Any]) -> Any:
    if schema is None:
        return None
    if "dict" in schema:
        return {_unkey(k): _decode(v, tensors) for k, v in schema["dict"]}
    if "tuple" in schema:
        return tuple(_decode(v, tensors) for v in schema["tuple"])
    if "list" in schema:
        return [_decode(v, tensors) for v in schema["list"]]
    return tensors[schema["t"]]


@dataclasses.dataclass
class Resumed:
    """A loaded checkpoint: the next layer to run (``len(layers)``: the head; ``len(layers) + 1``: done), every
    stage's amax leaves (host arrays), and per batch its ``(x, ctx, ok)`` (host arrays; empty when done)."""

    next_layer: int
    parts_amax: list[list[np.ndarray]]
    acts: list[tuple]


class LayerCheckpoint:
    """The checkpoint file of one layerwise calibration (module doc)."""

    def __init__(self, directory: str | Path, fingerprint: str, save_every: int = 1):
        if save_every < 1:
            raise CheckpointError(f"layerwise save_every must be >= 1, got {save_every}.")
        self.directory = Path(directory).expanduser()
        self.path = self.directory / FILE_NAME
        self.fingerprint = fingerprint
        self.save_every = int(save_every)

    def due(self, next_layer: int, n_layers: int) -> bool:
        """Whether to save after running layer ``next_layer - 1`` (every ``save_every`` layers and the last)."""
        return next_layer >= n_layers or next_layer % self.save_every == 0

    def load(self) -> Resumed | None:
        """The saved state, or None when there is none. Raises ``CheckpointError`` for another run's or a damaged
        file, naming it."""
        if not self.path.is_file():
            return None
        from jaxquant.io.safetensors import SafetensorsFile

        try:
            f = SafetensorsFile(self.path)
            meta = f.metadata
            if meta.get("format") != FILE_FORMAT or meta.get("version") != FILE_VERSION:
                raise CheckpointError(f"{self.path} is not a jaxquant layerwise checkpoint (version {FILE_VERSION}).")
            if meta.get("fingerprint") != self.fingerprint:
                raise CheckpointError(
                    f"{self.path} belongs to another calibration (other model weights, recipe or calibration "
                    "tokens); resuming from it would mix two runs. Use an empty checkpoint directory for this run, "
                    "or delete that file.")
            tensors = {k: np.array(f.get(k)) for k in f.keys()}
            schema = json.loads(meta["schema"])
            return Resumed(int(meta["next_layer"]), _decode(schema["amax"], tensors), _decode(schema["acts"], tensors))
        except CheckpointError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{self.path} cannot be read ({e}); delete it to calibrate from the start.") from None

    def save(self, next_layer: int, parts_amax: list[list[Any]], acts: list[tuple]) -> None:
        """Replace the checkpoint with this state (``acts``: per batch ``(x, ctx, ok)``; device arrays are copied
        to the host)."""
        import jax

        from jaxquant.io.safetensors import save_file_atomic

        tensors: dict[str, Any] = {}
        schema = {"amax": _encode([list(p) for p in parts_amax], "amax", tensors),
                  "acts": _encode([tuple(a) for a in acts], "acts", tensors)}
        host = dict(zip(tensors, jax.device_get(list(tensors.values())), strict=True))
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "fingerprint": self.fingerprint,
                "next_layer": str(next_layer), "schema": json.dumps(schema)}
        try:
            save_file_atomic(host, self.path, meta)
        except OSError as e:
            raise CheckpointError(f"writing the layerwise checkpoint {self.path} failed ({e.strerror or e}). Free "
                                  "space or choose another checkpoint directory.") from None
        log.info("layerwise checkpoint: %s (next layer %d)", self.path, next_layer)

    def save_tensors(self, name: str, tensors: dict[str, Any]) -> None:
        """An algorithm's per-layer arrays (GPTQ's updated weights) to ``DIR/<name>.safetensors``, atomically, marked
        with this run's fingerprint."""
        import jax

        from jaxquant.io.safetensors import save_file_atomic

        path = self.directory / f"{name}.safetensors"
        host = dict(zip(tensors, jax.device_get(list(tensors.values())), strict=True))
        try:
            save_file_atomic(host, path, {"format": FILE_FORMAT, "version": FILE_VERSION,
                                          "fingerprint": self.fingerprint})
        except OSError as e:
            raise CheckpointError(f"writing {path} failed ({e.strerror or e}). Free space or choose another "
                                  "checkpoint directory.") from None

    def load_tensors(self, name: str) -> dict[str, np.ndarray]:
        """What ``save_tensors(name, ...)`` wrote. Raises ``CheckpointError`` for a missing, damaged or foreign file."""
        from jaxquant.io.safetensors import SafetensorsFile

        path = self.directory / f"{name}.safetensors"
        try:
            f = SafetensorsFile(path)
            if f.metadata.get("fingerprint") != self.fingerprint:
                raise CheckpointError(f"{path} belongs to another calibration; delete the checkpoint directory's "
                                      "files to calibrate from the start.")
            return {k: np.array(f.get(k)) for k in f.keys()}
        except CheckpointError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path} cannot be read ({e}); delete the checkpoint directory's files to "
                                  "calibrate from the start.") from None


__all__ = ["FILE_NAME", "LayerCheckpoint", "Resumed", "fingerprint"]
