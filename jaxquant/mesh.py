"""Sharded calibration and export over a ``jax.sharding.Mesh`` (``jaxquant ptq --mesh``, ``mesh=`` in the API).

The mesh always has the three axes ``AXES = ("data", "fsdp", "tensor")`` (size 1 where not asked for), laid out
with ``tensor`` innermost (neighbouring devices) and ``data`` outermost. What goes where:

* parameters: by their family's partition rules (``models/partition.py``, ``FamilySpec.partition_rules``):
  rows over ``fsdp``, heads / MLP features / experts over ``tensor``; a tensor with a dimension its axes do not
  divide is replicated (``param_spec``);
* inside each jitted stage, a weight is gathered over ``fsdp`` (``compute_shardings``): stored split, computed
  whole, so every dot product has its single-device shape; the ``tensor`` split stays (tensor parallelism);
* calibration batches: each device of a ``tensor`` group gets whole batches of the shape a single device would
  see, ``data x fsdp`` of them per step (``global_batches``), so XLA runs the same code on them and the statistics
  are the single-device ones bit for bit (docs/scale.md says why the shape matters);
* everything else the calibration holds (quantizer statistics, flags) and the activations' feature dimensions:
  replicated. XLA's SPMD partitioner (GSPMD) places the rest inside each jitted stage; the amax reductions are
  ``jnp.max`` over sharded arrays, which XLA reduces across the devices (a max is exact in any order);
* on the CPU backend, each multi-device computation is waited for before the next (``settle``).

Export reads one tensor at a time (``np.asarray`` of a sharded array gathers it), so host memory holds one
gathered tensor per writer thread, never the model.

Nothing here is used without a mesh: ``mesh=None`` is the single-device path, unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxquant.errors import UnsupportedError

AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
#: The axes a calibration batch's rows are split over, outermost first.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


class MeshError(UnsupportedError, ValueError):
    """A ``--mesh`` / ``mesh=`` specification that cannot be built on this machine's devices."""


# ----------------------------------------------------------------------------------------------- building
def parse_mesh_spec(spec: str | Mapping[str, int] | None, n_devices: int) -> dict[str, int]:
    """``"tensor=2,fsdp=4"`` (or ``{"tensor": 2, "fsdp": 4}``) -> ``{"data": 1, "fsdp": 4, "tensor": 2}``.

    An empty string (``--mesh`` without a value) or None puts every device on ``fsdp``. Axes left out are 1; the
    sizes must multiply to ``n_devices`` (every device of the process, of every process after
    ``jax.distributed.initialize()``).

    Raises:
      MeshError: an unknown axis, a repeated axis, a size that is not a positive integer, a malformed
        ``AXIS=N`` item, or sizes whose product is not ``n_devices``.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {"data": 1, "fsdp": n_devices, "tensor": 1}
    items: list[tuple[str, Any]]
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise MeshError(f"--mesh {spec!r}: {part!r} is not AXIS=N (axes: {', '.join(AXES)}; e.g. "
                                "--mesh tensor=2,fsdp=4).")
            items.append((name.strip(), value.strip()))
    sizes = {a: 1 for a in AXES}
    seen = set()
    for name, value in items:
        if name not in AXES:
            raise MeshError(f"--mesh {spec!r}: unknown axis {name!r}; the axes are {', '.join(AXES)}.")
        if name in seen:
            raise MeshError(f"--mesh {spec!r}: axis {name!r} is given twice.")
        seen.add(name)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            n = int(value)
        else:
            n = int(value) if str(value).strip().isdigit() else 0
        if n <= 0:
            raise MeshError(f"--mesh {spec!r}: the size of {name!r} must be a positive integer, got {value!r}.")
        sizes[name] = n
    total = math.prod(sizes.values())
    if total != n_devices:
        shown = " x ".join(f"{a}={sizes[a]}" for a in AXES if sizes[a] > 1) or "1"
        raise MeshError(f"--mesh {spec!r}: {shown} = {total} devices, but this process sees {n_devices} "
                        f"({jax.default_backend()}); the sizes must multiply to {n_devices}.")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | Mesh | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``AXES`` over ``devices`` (default: every device of the default backend, on every
    host after ``jax.distributed.initialize()``) from ``parse_mesh_spec``'s ``spec``. A ``Mesh`` is returned as it
    is when it has the three axes (``MeshError`` otherwise)."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != AXES:
            raise MeshError(f"a mesh for jaxquant has the axes {AXES}, got {tuple(spec.axis_names)}; build it with "
                            "jaxquant.mesh.make_mesh.")
        return spec
    devices = list(devices) if devices is not None else jax.devices()
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)
    except (ValueError, NotImplementedError):  # a device set make_mesh cannot lay out: plain row-major order
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def describe(mesh: Mesh) -> str:
    """``"8 cpu devices: data=2 x fsdp=4"`` (axes of size 1 left out)."""
    sizes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "one device"
    return f"{mesh.devices.size} {mesh.devices.flat[0].platform} devices: {sizes}"


# ----------------------------------------------------------------------------------------------- placement
def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def _axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def param_spec(rules: Sequence[tuple[str, tuple]], path: str, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of parameter ``path`` (NNX dotted path) of ``shape``: the first rule whose pattern
    matches the whole path, with axes of size 1 dropped. Replicated (``PartitionSpec()``) when no rule matches,
    the rule has another rank than the tensor, or a dimension is not divisible by the product of its axes."""
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            break
    else:
        return PartitionSpec()
    if len(spec) != len(shape):
        return PartitionSpec()
    out = []
    for dim, axes in zip(shape, spec):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(a for a in names if mesh.shape[a] > 1)
        if names and dim % _axes_size(mesh, names):
            return PartitionSpec()
        out.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*out)


def param_sharding(mesh: Mesh, config: Any) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """``fn(nnx_path, shape) -> NamedSharding`` by ``config``'s family rules (what ``load_hf(sharding=)`` takes)."""
    rules = getattr(getattr(config, "spec", None), "partition_rules", ())
    return lambda path, shape: NamedSharding(mesh, param_spec(rules, path, shape, mesh))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a calibration array whose first dimension is the batch (ids, masks, hidden states, RoPE
    tables): rows over ``data`` and ``fsdp`` when they divide it, else over ``data`` alone, else replicated;
    every other dimension replicated."""
    if not shape:
        return replicated(mesh)
    for k in range(len(BATCH_AXES), 0, -1):
        axes = tuple(a for a in BATCH_AXES[:k] if mesh.shape[a] > 1)
        if axes and shape[0] % _axes_size(mesh, axes) == 0:
            return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))
    return replicated(mesh)


def global_batches(items: Iterable[tuple[int, Any, Any, int]], mesh: Mesh):
    """Calibration batches for a mesh: ``data x fsdp`` consecutive batches of one shape ``[b, S]`` concatenated into
    one ``[data x fsdp x b, S]`` batch whose rows are split so each device receives exactly one of them, at the
    position it has in a single-device run. ``items``: ``(index, ids, mask, real tokens)`` (numpy); yields the
    same, on the mesh.

    A group that falls short (the end of the data, or a batch of another shape, e.g. the last smaller one) is
    filled with batches of the same shape whose attention mask is all zero: they add no token to any statistic
    (every activation quantizer ignores masked positions). Keeping each device's batch the shape a single device
    would see keeps XLA's code for it the same, and with it the float results, bit for bit (see docs/scale.md:
    XLA:CPU picks reduction and matmul code by operand size)."""
    per = _axes_size(mesh, BATCH_AXES)
    group: list[tuple[int, Any, Any, int]] = []

    def flush():
        i0 = group[0][0]
        shape = np.shape(group[0][1])
        ids = [np.asarray(g[1]) for g in group] + [np.zeros(shape, np.int32)] * (per - len(group))
        masks = None
        if len(group) < per or any(g[2] is not None for g in group):  # a mask where one is given or rows are filled
            masks = [np.ones(shape, np.int32) if g[2] is None else np.asarray(g[2]) for g in group]
            masks += [np.zeros(shape, np.int32)] * (per - len(group))
        where = batch_sharding(mesh, (per * shape[0],) + tuple(shape[1:]))
        out = (i0, jax.device_put(np.concatenate(ids), where),
               None if masks is None else jax.device_put(np.concatenate(masks), where), sum(g[3] for g in group))
        group.clear()
        return out

    for item in items:
        if group and np.shape(item[1]) != np.shape(group[0][1]):
            yield flush()
        group.append(item)
        if len(group) == per:
            yield flush()
    if group:
        yield flush()


def batch_tree_sharding(mesh: Mesh, tree: Any, batch: int) -> Any:
    """``tree`` (arrays or ``ShapeDtypeStruct``s, None kept) mapped to shardings: ``batch_sharding`` for leaves
    whose first dimension is ``batch``, ``replicated`` for the others."""
    def one(x):
        shape = tuple(x.shape)
        return batch_sharding(mesh, shape) if shape and shape[0] == batch else replicated(mesh)

    return jax.tree_util.tree_map(one, tree)


def constrain_batch(mesh: Mesh | None, tree: Any, batch: int) -> Any:
    """Inside a jitted function: ``tree``'s arrays constrained to ``batch_tree_sharding`` (identity without a
    mesh). Keeps the activations between stages split by rows only."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_tree_sharding(mesh, tree, batch))


def constrain_replicated(mesh: Mesh | None, tree: Any) -> Any:
    """Inside a jitted function: ``tree``'s arrays replicated over ``mesh`` (identity without a mesh)."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, jax.tree_util.tree_map(lambda _: replicated(mesh), tree))


#: The axes a parameter stays split over while a stage computes with it (``gathered``): ``fsdp`` only stores.
COMPUTE_AXES: tuple[str, ...] = ("tensor",)


def _keep_axes(spec: PartitionSpec, keep: Sequence[str]) -> PartitionSpec:
    out = []
    for axes in spec:
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(a for a in names if a in keep)
        out.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*out)


def compute_shardings(mesh: Mesh | None, leaves: Sequence[Any]) -> list[NamedSharding | None] | None:
    """The shardings a stage computes with for its parameter ``leaves`` (arrays or ``ShapeDtypeStruct``s with
    a sharding): each one's sharding without the ``fsdp`` (and ``data``) axes, so XLA all-gathers a weight over
    ``fsdp`` where the stage uses it (FSDP: stored split, computed whole) and keeps only the ``tensor`` split.
    None without a mesh (and for a leaf that is not an array). Apply with ``constrain(leaves, shardings)`` inside the
    jitted stage."""
    if mesh is None:
        return None
    out: list[NamedSharding | None] = []
    for x in leaves:
        if not hasattr(x, "shape"):
            out.append(None)
            continue
        s = getattr(x, "sharding", None)
        spec = s.spec if isinstance(s, NamedSharding) else PartitionSpec()
        out.append(NamedSharding(mesh, _keep_axes(spec, COMPUTE_AXES)))
    return out


def constrain(leaves: Sequence[Any], shardings: Sequence[NamedSharding | None] | None) -> Any:
    """Inside a jitted function: each of ``leaves`` constrained to its sharding (``compute_shardings``); ``leaves``
    as they are for None."""
    if shardings is None:
        return leaves
    return [x if s is None else jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, shardings)]


def settle(tree: Any) -> Any:
    """Wait for ``tree``'s arrays when they span several CPU devices; return it.

    XLA:CPU runs the per-device parts of a multi-device program as tasks on a pool with about one thread per
    device. With two such programs in flight, the parts of one can hold every thread, waiting in a collective for
    a part that waits on its device's in-flight semaphore behind the other program: a deadlock (seen with 8 virtual
    devices: 7 parts in an all-reduce, the 8th blocked; XLA aborts after 40 s). So on the CPU backend each
    multi-device computation is waited for before the next is launched. Accelerators run collectives on device
    streams and keep asynchronous dispatch."""
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            devices = x.sharding.device_set
            if len(devices) > 1 and next(iter(devices)).platform == "cpu":
                jax.block_until_ready(tree)
            break
    return tree


def on_mesh(mesh: Mesh, x: Any) -> bool:
    """Whether ``x`` is a ``jax.Array`` laid out over exactly ``mesh``'s devices."""
    return isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat)


def to_mesh(mesh: Mesh, leaves: list[Any]) -> list[Any]:
    """``leaves`` with every array not already over ``mesh`` replicated onto it (the others as they are)."""
    return [x if not isinstance(x, jax.Array) or on_mesh(mesh, x) else jax.device_put(x, replicated(mesh))
            for x in leaves]


def replicate(mesh: Mesh, leaves: list[Any]) -> list[Any]:
    """``leaves`` with every array that is not already a full copy on each device of ``mesh`` replicated onto it
    (small state: quantizer statistics)."""
    return [x if not isinstance(x, jax.Array) or (on_mesh(mesh, x) and x.sharding.is_fully_replicated)
            else jax.device_put(x, replicated(mesh)) for x in leaves]


def place_model(model: Any, mesh: Mesh, config: Any = None) -> int:
    """Put every array of ``model``'s state onto ``mesh``: parameters by their family's rules (``config``:
    default ``model.config``), everything else (quantizer statistics, buffers) replicated. Arrays already over the
    mesh stay where they are. Returns how many arrays moved."""
    from flax import nnx

    from jaxquant.converters.names import dotted

    config = config if config is not None else getattr(model, "config", None)
    shard = param_sharding(mesh, config)
    moved = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value() if hasattr(var, "get_value") else None
        if not isinstance(value, jax.Array) or on_mesh(mesh, value):
            continue
        target = shard(dotted(path), tuple(value.shape)) if isinstance(var, nnx.Param) else replicated(mesh)
        var.set_value(jax.device_put(value, target))
        moved += 1
    return moved


def mesh_of(model: Any) -> Mesh | None:
    """The jaxquant ``Mesh`` ``model``'s parameters are laid out over (the first one found), or None."""
    from flax import nnx

    from jaxquant.models.walk import iter_variables

    for _, var in iter_variables(model, nnx.Param):
        s = getattr(var.get_value(), "sharding", None)
        if isinstance(s, NamedSharding) and tuple(s.mesh.axis_names) == AXES and s.mesh.devices.size > 1:
            return s.mesh
    return None


def resolve(model: Any, mesh: Mesh | str | Mapping[str, int] | None) -> Mesh | None:
    """The mesh ``quantize(mesh=...)`` runs on: ``mesh`` (a spec is built with ``make_mesh``), else the one the
    model's parameters are laid out over, else None (single device)."""
    if mesh is not None:
        return make_mesh(mesh)
    return mesh_of(model)


__all__ = ["AXES", "BATCH_AXES", "MeshError", "batch_sharding", "batch_tree_sharding", "constrain_batch",
           "constrain_replicated", "compute_shardings", "constrain", "describe", "global_batches", "make_mesh", "mesh_of", "on_mesh", "param_sharding", "param_spec",
           "place_model", "parse_mesh_spec", "replicate", "replicated", "resolve", "settle", "to_mesh"]
