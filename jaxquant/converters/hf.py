"""Hugging Face checkpoint directory -> ``ModelConfig`` + Flax NNX model, without torch.

``load_hf(dir)`` reads ``config.json``, opens ``model.safetensors`` (or the shards of
``model.safetensors.index.json``) memory-mapped, builds the model abstractly (``nnx.eval_shape``,
no memory) and fills each parameter from its mapped tensor: one tensor at a time is converted to
the requested dtype and placed with ``jax.device_put``, so the host never holds a second full
copy of the weights.

Tensors outside the text decoder (vision tower, projector, ...) are not loaded; ``extra_tensors``
keeps a lazy reference to each (by its transformers-v5 name) so export can write them back
unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import logging
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.converters.names import NameMap, dotted, param_paths
from jaxquant.errors import CheckpointError, NonFiniteError, UnsupportedError
from jaxquant.io.safetensors import CheckpointFiles, SafetensorsFile
from jaxquant.models.config import ModelConfig
from jaxquant.models.decoder import abstract_model
from jaxquant.numerics.checks import host_all_finite
from jaxquant.tokenizer import load_tokenizer, refuse_tokenizer_code  # noqa: F401 - the loaders' API
from jaxquant.models.walk import iter_variables

log = logging.getLogger(__name__)

LOADABLE_DTYPES = ("F32", "F16", "BF16", "F64")
DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16,
          "float32": jnp.float32, "fp32": jnp.float32}


class UnsupportedDtypeError(UnsupportedError, ValueError):
    """A model dtype jaxquant does not load (an ``UnsupportedError``; also a ``ValueError``, which it used to be)."""


def resolve_dtype(dtype) -> jnp.dtype:
    """``"bf16"`` / ``"float32"`` / ``jnp.bfloat16`` ... -> a jnp dtype (bf16, fp16 or fp32).

    Raises ``UnsupportedDtypeError`` (an ``UnsupportedError`` and a ``ValueError``, so ``except ValueError``
    callers keep working) for anything else.
    """
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise UnsupportedDtypeError(f"dtype {dtype!r}: models load as one of {', '.join(DTYPES)}.")
        return jnp.dtype(DTYPES[dtype.lower()])
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise UnsupportedDtypeError(f"dtype {dtype!r}: models load as bfloat16, float16 or float32 "
                               f"(or one of {', '.join(DTYPES)}).") from None
    if d not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise UnsupportedDtypeError(f"dtype {d}: models load as bfloat16, float16 or float32.")
    return d


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor left in its (memory-mapped) file: ``get()`` returns a zero-copy numpy view."""

    file: SafetensorsFile
    name: str  # name inside the file (may be a legacy name)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.tensor_info(self.name).shape

    @property
    def dtype(self) -> str:
        return self.file.tensor_info(self.name).dtype

    def get(self) -> np.ndarray:
        return self.file.get(self.name)


@dataclasses.dataclass
class LoadedModel:
    """What a loader returns.

    Attributes:
      model: the ``CausalLM`` (NNX) with weights in the requested dtype.
      config: its ``ModelConfig``.
      extra_tensors: non-text tensors by transformers-v5 name, left lazy (vision tower, projector).
      hf_config: the ``config.json`` dict (for GGUF: the equivalent dict built from metadata).
      source_dir: checkpoint directory (for GGUF: the folder holding the file).
      name_map: NNX path <-> HF name map of this checkpoint.
      gguf_file: the GGUF file name when loaded from GGUF, else None.
    """

    model: nnx.Module
    config: ModelConfig
    extra_tensors: dict[str, LazyTensor]
    hf_config: dict[str, Any]
    source_dir: Path
    name_map: NameMap
    gguf_file: str | None = None

    def tokenizer(self):
        """transformers' ``AutoTokenizer`` for this checkpoint (see ``load_tokenizer``)."""
        return load_tokenizer(self.source_dir, gguf_file=self.gguf_file)


class TensorSource(Protocol):
    """Where a loader reads HF-named tensors from (safetensors files, a GGUF file)."""

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> str: ...

    def get(self, name: str) -> np.ndarray: ...

    def where(self, name: str) -> str: ...


Sharding = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None] | None


#: Threads that copy tensors to the device (host reads, dtype casts and transfers overlap; one thread
#: reached 2.6 GB/s on an H200 host, 8-16 about 3-3.4: benchmarks/results/README.md).
LOAD_WORKERS = 8
#: Bytes of tensors being copied at once (a bound on the host memory that dtype casts hold).
LOAD_INFLIGHT_BYTES = 2 << 30
#: The interpreter's thread switch interval (s) while the loader's threads run (Python's default is 0.005): each
#: tensor's read, cast, check and copy hand the interpreter lock back and forth, and beside a thread that runs
#: Python for seconds (the calibration's tracing on the compile thread) every handoff could wait a full interval.
#: None leaves the interval alone.
LOAD_SWITCH_INTERVAL: float | None = 0.0005


def materialize(
    config: ModelConfig,
    source: TensorSource,
    *,
    dtype=jnp.bfloat16,
    name_map: NameMap | None = None,
    sharding: Sharding = None,
    workers: int | None = None,
    abstract: nnx.Module | None = None,
) -> nnx.Module:
    """Build ``config``'s model abstractly and fill every parameter from ``source``.

    ``abstract``: ``abstract_model(config, dtype=dtype)`` when the caller built it already (it is not modified).

    ``source`` is asked for HF names (after the family's text prefix). Every tensor is checked (present,
    shape, loadable dtype) before any is read (``plan_load``); then ``load_params`` reads them. Raises
    ``CheckpointError`` naming the file and tensor for a missing tensor, a shape mismatch or an unloadable
    dtype, ``NonFiniteError`` for NaN / Inf.
    """
    dtype = resolve_dtype(dtype)
    graphdef, state = nnx.split(abstract if abstract is not None else abstract_model(config, dtype=dtype))
    plan = plan_load(config, source, state, dtype=dtype, name_map=name_map, sharding=sharding)
    load_params(plan, source, dtype=dtype, workers=workers)
    return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class LoadItem:
    """One parameter to read: its NNX variable, HF name, target sharding (None: the default device) and bytes."""

    var: Any
    hf: str
    sharding: Any
    nbytes: int


def plan_load(config: ModelConfig, source: TensorSource, state, *, dtype, name_map: NameMap | None = None,
              sharding: Sharding = None) -> list[LoadItem]:
    """Check every parameter of the (abstract) ``state`` against ``source`` without reading any tensor: present,
    of the shape ``config`` implies, of a loadable dtype. Returns the ``LoadItem`` per parameter, in model order.

    Raises ``CheckpointError`` naming the file and tensor (missing, shape mismatch, unloadable dtype)."""
    nm = name_map or NameMap.for_config(config)
    plan = []
    for path, var in nnx.to_flat_state(state):
        path_s = dotted(path)
        if not isinstance(var, nnx.Param):
            raise CheckpointError(f"internal: model has non-parameter state {path_s!r} before loading")
        expected = tuple(var.get_value().shape)
        hf = nm.hf_name(path_s)
        if not source.has(hf):
            raise CheckpointError(
                f"{source.where(hf)}: tensor {hf!r} is missing; {config.architecture} with this config.json "
                "needs it. The checkpoint is incomplete or belongs to another architecture."
            )
        shape = tuple(source.shape(hf))
        if shape != expected:
            raise CheckpointError(
                f"{source.where(hf)}: tensor {hf!r} has shape {list(shape)}, but config.json implies "
                f"{list(expected)}."
            )
        tag = source.dtype(hf)
        if tag not in LOADABLE_DTYPES:
            raise CheckpointError(
                f"{source.where(hf)}: tensor {hf!r} has dtype {tag}; jaxquant loads unquantized checkpoints "
                f"({', '.join(LOADABLE_DTYPES)}). Start from the original (bf16/fp16/fp32) model."
            )
        shd = sharding(path_s, expected) if callable(sharding) else sharding
        plan.append(LoadItem(var, hf, shd, int(np.prod(expected)) * np.dtype(dtype).itemsize))
    return plan


def load_params(plan: list[LoadItem], source: TensorSource, *, dtype, workers: int | None = None) -> None:
    """Read each planned tensor from ``source``, cast it to ``dtype`` on the host, copy it to its device and set
    its variable. ``workers`` threads (default ``LOAD_WORKERS`` for a safetensors source, which is safe to read
    from several threads, else 1), at most ``LOAD_INFLIGHT_BYTES`` at a time; a memory-mapped source's pages are
    released as they are read. Raises ``NonFiniteError`` naming the tensors holding NaN / Inf after the cast."""
    dtype = resolve_dtype(dtype)
    release = getattr(source, "release", None)
    nonfinite: list[str] = []

    def put(hf, shd):
        rel = None if release is None else (lambda lo, hi: release(hf, lo, hi))
        arr = _host_cast(source.get(hf), np.dtype(dtype), rel)
        if not host_all_finite(arr):
            nonfinite.append(hf)
        x = to_device(arr, shd)
        del arr
        if release is not None:
            jax.block_until_ready(x)  # the mapped pages are read: drop them from this process
            release(hf)
        return x

    if workers is None:
        workers = LOAD_WORKERS if isinstance(source, SafetensorsSource) else 1
    if workers <= 1:
        for it in plan:
            it.var.set_value(put(it.hf, it.sharding))
        _refuse_nonfinite(nonfinite, plan, source)
        return
    pending: collections.deque = collections.deque()
    inflight = 0
    with (_switch_interval(LOAD_SWITCH_INTERVAL),
          cf.ThreadPoolExecutor(workers, thread_name_prefix="jaxquant-load") as pool):
        try:
            for it in plan:
                while pending and inflight + it.nbytes > LOAD_INFLIGHT_BYTES:
                    v, f, m = pending.popleft()
                    v.set_value(f.result())
                    inflight -= m
                pending.append((it.var, pool.submit(put, it.hf, it.sharding), it.nbytes))
                inflight += it.nbytes
            while pending:
                v, f, _ = pending.popleft()
                v.set_value(f.result())
        except BaseException:
            for _, f, _ in pending:
                f.cancel()
            raise
    _refuse_nonfinite(nonfinite, plan, source)


@contextlib.contextmanager
def _switch_interval(seconds: float | None):
    """``sys.setswitchinterval(seconds)`` inside the block (unless None or already shorter)."""
    old = sys.getswitchinterval()
    if seconds is None or seconds >= old:
        yield
        return
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _refuse_nonfinite(names: list[str], plan, source) -> None:
    """``NonFiniteError`` naming (in model order) the loaded tensors that hold NaN or Inf after the dtype cast."""
    if not names:
        return
    bad = set(names)
    ordered = [it.hf for it in plan if it.hf in bad]
    shown = ", ".join(ordered[:5]) + (f" and {len(ordered) - 5} more" if len(ordered) > 5 else "")
    raise NonFiniteError(f"{source.where(ordered[0])}: the tensors {shown} hold NaN or Inf (after the cast to the "
                         "load dtype); every forward pass would be NaN. The checkpoint is corrupt or was converted to "
                         "a dtype that overflows.")


def to_device(arr: np.ndarray, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """``jax.device_put(arr, sharding)`` (None: the default device), staged through pinned host memory when the
    target is accelerator memory that has a ``pinned_host`` kind (GPU): a host copy into pinned memory, then a DMA,
    which ran at 7.2 GB/s on 8 threads on an H100 host against 4.5-5.2 GB/s for a direct copy from the
    memory-mapped file (benchmarks/results/README.md). Anything else is copied directly.
    """
    target = sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        devices = list(target.device_set)
        staged = (getattr(target, "memory_kind", None) in (None, "device") and devices[0].platform != "cpu"
                  and all("pinned_host" in {m.kind for m in d.addressable_memories()} for d in devices))
    except Exception:  # noqa: BLE001 - a sharding or platform without memory kinds: copy directly
        staged = False
    if not staged:
        return jax.device_put(arr, sharding) if sharding is not None else jax.device_put(arr)
    host = jax.device_put(arr, target.with_memory_kind("pinned_host"))
    return jax.device_put(host, target.with_memory_kind("device"))


_CHUNK_BYTES = 64 << 20


def _host_cast(arr: np.ndarray, dtype: np.dtype, release: Callable[[int, int], None] | None) -> np.ndarray:
    """``arr`` in ``dtype`` on the host, converted 64 MiB at a time (round to nearest even, as torch).

    ``release(lo, hi)`` is told which source bytes are done, so a memory-mapped source's pages can be
    dropped while the copy proceeds: the transient cost is one converted tensor, not two.
    """
    if arr.dtype == dtype:
        return arr
    out = np.empty(arr.shape, dtype)
    src, dst = arr.reshape(-1), out.reshape(-1)
    step = max(1, _CHUNK_BYTES // arr.dtype.itemsize)
    for i in range(0, src.size, step):
        j = min(i + step, src.size)
        dst[i:j] = src[i:j]
        if release is not None:
            release(i * arr.dtype.itemsize, j * arr.dtype.itemsize)
    return out


class SafetensorsSource:
    """``TensorSource`` over an HF checkpoint directory (legacy names resolved via the name map)."""

    def __init__(self, files: CheckpointFiles, name_map: NameMap):
        self.files = files
        self.by_canonical: dict[str, str] = {}
        for k in files.keys():
            self.by_canonical.setdefault(name_map.canonical(k), k)

    def _src(self, name: str) -> str:
        return self.by_canonical.get(name, name)

    def has(self, name):
        return self._src(name) in self.files

    def shape(self, name):
        return self.files.tensor_info(self._src(name)).shape

    def dtype(self, name):
        return self.files.tensor_info(self._src(name)).dtype

    def get(self, name):
        return self.files.get(self._src(name))

    def release(self, name, lo: int = 0, hi: int | None = None):
        """Drop the mapped pages of bytes ``[lo, hi)`` of tensor ``name`` from this process.

        They stay in the OS page cache. Without this, every tensor read through the memory map
        stays resident, so peak RSS would be file size + model size.
        """
        src = self._src(name)
        f = self.files.name_to_file.get(src)
        buf = getattr(f, "_mmap", None) if f is not None else None
        if buf is None or not hasattr(buf, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = f.tensor_info(src)
        base = f._data_start + info.begin
        start = base + lo
        end = f._data_start + info.end if hi is None else base + hi
        page = mmap.PAGESIZE
        start -= start % page
        end = min(end - end % page, len(buf))  # whole pages only; a partial page may be shared
        if end > start:
            try:
                buf.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):  # pragma: no cover - best effort
                pass

    def where(self, name):
        src = self._src(name)
        f = self.files.name_to_file.get(src)
        if f is not None:
            return str(f.path)
        d = self.files.directory
        index = d / "model.safetensors.index.json"
        if index.is_file():
            return str(index)
        names = sorted(self.files.files)
        return str(d / names[0]) if len(names) == 1 else f"{d} ({', '.join(names)})"


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{Path(path)}: no config.json; expected a Hugging Face model directory.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e}).") from None


def load_hf(path: str | os.PathLike, dtype=jnp.bfloat16, *, sharding: Sharding = None, mesh=None,
            abstract: nnx.Module | None = None) -> LoadedModel:
    """Load an HF checkpoint directory (``config.json`` + safetensors) as a Flax NNX model.

    Args:
      path: the directory.
      dtype: parameter / activation dtype: ``jnp.bfloat16`` (default), ``jnp.float16`` or ``jnp.float32``.
      sharding: a ``jax.sharding.Sharding`` for every parameter, or ``fn(nnx_path, shape) -> Sharding``.
      mesh: lay the parameters out over a ``jax.sharding.Mesh`` by the family's partition rules
        (``jaxquant.mesh``; a ``Mesh`` or a spec such as ``"tensor=2,fsdp=4"``): each tensor is read once and
        each device receives its part. Not together with ``sharding``.
      abstract: ``abstract_model(config, dtype=dtype)`` of this checkpoint's config, built already (``open_hf``).

    Raises:
      UnsupportedError: unknown architecture (the message lists the supported ones).
      CheckpointError: missing / truncated shard, missing tensor, shape mismatch, unloadable dtype.
    """
    dtype = resolve_dtype(dtype)
    d = Path(path)
    if mesh is not None and sharding is not None:
        raise UnsupportedError("load_hf: pass mesh= or sharding=, not both (mesh= derives the sharding from the "
                               "family's partition rules).")
    if d.is_file() and d.suffix == ".gguf":
        from jaxquant.converters.gguf import load_gguf

        loaded = load_gguf(d, dtype=dtype, sharding=sharding)
        if mesh is not None:
            from jaxquant.mesh import make_mesh, place_model

            place_model(loaded.model, make_mesh(mesh))
        return loaded
    loaded, source = open_hf(d, dtype, abstract=abstract)
    if mesh is not None:
        from jaxquant.mesh import make_mesh, param_sharding

        sharding = param_sharding(make_mesh(mesh), loaded.config)
    plan = plan_load(loaded.config, source, nnx.state(loaded.model), dtype=dtype, name_map=loaded.name_map,
                     sharding=sharding)
    load_params(plan, source, dtype=dtype)
    return loaded


def open_hf(path: str | os.PathLike, dtype=jnp.bfloat16, *,
            abstract: nnx.Module | None = None) -> tuple[LoadedModel, TensorSource]:
    """An HF checkpoint directory opened without loading it: ``(LoadedModel, source)`` where the model's
    parameters are ``ShapeDtypeStruct`` leaves (no memory) and ``source`` is the memory-mapped ``TensorSource``
    they are read from (``plan_load`` / ``load_params``; the streamed ``--layerwise`` path reads one decoder layer
    at a time). Raises as ``load_hf`` does for the config, a quantized checkpoint and stray tensors. ``abstract``:
    the model built already (``abstract_model(config, dtype=dtype)`` of this checkpoint; it becomes the model).
    """
    dtype = resolve_dtype(dtype)
    d = Path(path)
    hf_config = read_hf_config(d)
    plain = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    ModelConfig.from_hf_config(plain, source=str(d / "config.json"))  # an unknown architecture first
    files = CheckpointFiles.open(d)
    reason = quantized_checkpoint_reason(d, hf_config, files)
    if reason is not None:
        raise CheckpointError(
            f"{d}: this is a quantized checkpoint ({reason}); load_hf and `jaxquant ptq` start from the original "
            "unquantized (bf16/fp16/fp32) model. Evaluate it with `jaxquant eval` or "
            "`jaxquant.export.load_quantized(dir)`, or quantize the original model."
            + ("" if (d / "hf_quant_config.json").is_file() else
               " Its hf_quant_config.json is missing: copy it from the export next to config.json.")
        )
    config = ModelConfig.from_hf_config(hf_config, source=str(d / "config.json"))
    nm = NameMap.for_config(config)
    source = SafetensorsSource(files, nm)
    if config.spec.tensor_adapter:  # MoE families: stacked experts from per-expert / fused checkpoint tensors
        from jaxquant.models.config import import_object

        source = import_object(config.spec.tensor_adapter)(config, source)
    if abstract is not None:
        first = next(iter_variables(abstract), (None, None))[1]
        if getattr(abstract, "config", None) != config or (first is not None and first.get_value().dtype != dtype):
            raise ValueError(f"open_hf: the abstract model given was not built from {d}'s config in {dtype}")
    # the caller's abstract model (the command builds one for the ahead-of-time compilation too) becomes the model
    model = abstract if abstract is not None else abstract_model(config, dtype=dtype)
    plan_load(config, source, nnx.state(model), dtype=dtype, name_map=nm)  # every tensor checked before any read
    extra = collect_extra_tensors(files, nm, config, consumes=getattr(source, "consumes", None),
                                  owned=param_paths(model))
    return LoadedModel(model, config, extra, hf_config, d, nm), source


QUANTIZED_DTYPES = ("U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "U4", "I4")
_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")


def quantized_checkpoint_reason(path: str | os.PathLike, hf_config: Mapping[str, Any] | None = None,
                                files: CheckpointFiles | None = None) -> str | None:
    """Why the checkpoint directory ``path`` is a quantized (ModelOpt-style) one, or None for an unquantized one.

    Looks at ``hf_quant_config.json``, ``config.json["quantization_config"]`` and the tensors' dtypes and names
    (``U8`` / ``F8_E4M3`` ... weights, ``weight_scale`` / ``input_scale`` / ``k_scale`` tensors), so a quantized
    checkpoint whose JSON files were lost is recognized too. Reads headers only.
    """
    d = Path(path)
    if (d / "hf_quant_config.json").is_file():
        return "it has hf_quant_config.json"
    if hf_config is None:
        try:
            hf_config = read_hf_config(d)
        except CheckpointError:
            hf_config = {}
    qc = hf_config.get("quantization_config")
    if isinstance(qc, Mapping) and qc:
        return f"config.json has a quantization_config (quant_method {qc.get('quant_method')!r})"
    if files is None:
        try:
            files = CheckpointFiles.open(d)
        except CheckpointError:
            return None
    for suffix in (".weight", "_scale"):  # a packed / FP8 weight names the format best; then a scale
        for k in files.keys():
            tag = files.tensor_info(k).dtype
            if tag in QUANTIZED_DTYPES and k.endswith(suffix):
                return f"tensor {k!r} is {tag}"
    for k in files.keys():
        if k.endswith(_SCALE_SUFFIXES):
            return f"it holds the quantization scale {k!r}"
    return None


def collect_extra_tensors(files: CheckpointFiles, nm: NameMap, config: ModelConfig,
                          consumes: Callable[[str], bool] | None = None,
                          owned: Iterable[str] | None = None) -> dict[str, LazyTensor]:
    """Checkpoint tensors the text model does not own, keyed by their transformers-v5 name.

    ``consumes(name)`` (from a family's tensor adapter) marks tensors loaded under another layout (MoE experts).
    ``owned``: the model's NNX parameter paths when the caller has the (abstract) model already; else they are
    derived from ``config`` (one more abstract model, about half a second for 32 layers).
    """
    owned = frozenset(owned) if owned is not None else _owned_paths(config)
    extra: dict[str, LazyTensor] = {}
    unexpected = []
    for k in files.keys():
        if nm.is_ignored(k):
            continue
        canon = nm.canonical(k)
        p = nm.nnx_path(canon)
        if p is None:
            extra[canon] = LazyTensor(files.name_to_file[k], k)
        elif p == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied duplicate of the embedding
        elif p not in owned and not (consumes is not None and consumes(canon)):
            unexpected.append(canon)
            extra[canon] = LazyTensor(files.name_to_file[k], k)
    if unexpected:
        raise CheckpointError(
            f"{files.directory}: {len(unexpected)} tensors under the text decoder are not used by a "
            f"{config.architecture} with this config.json (first: {unexpected[0]!r}); the weights and "
            "config.json disagree."
        )
    return extra


_OWNED_CACHE: dict[ModelConfig, frozenset[str]] = {}


def _owned_paths(config: ModelConfig) -> frozenset[str]:
    """The NNX parameter paths of ``config``'s model (cached per config)."""
    owned = _OWNED_CACHE.get(config)
    if owned is None:
        owned = frozenset(param_paths(abstract_model(config, dtype=jnp.float32)))
        _OWNED_CACHE[config] = owned
    return owned


def model_state_dict(loaded: LoadedModel, *, include_extra: bool = False) -> Mapping[str, Any]:
    """``{HF name: array}`` of the model's parameters (plus the lazy extras when asked)."""
    out: dict[str, Any] = {}
    for path, var in iter_variables(loaded.model, nnx.Param):
        out[loaded.name_map.hf_name(path)] = var.get_value()
    if include_extra:
        for k, t in loaded.extra_tensors.items():
            out[k] = t
    return out
