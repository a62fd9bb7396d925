"""The calibration forward pass stage by stage: prologue, each decoder layer, head.

A causal LM whose text model offers the stage protocol (``prologue``, ``layer_kwargs``, ``epilogue``,
``carried_kwargs``: ``models/decoder.py``) runs a calibration batch as ``2 + L`` jitted calls instead of one
whole-model call. Each call is compiled for its own graph definition and shapes, so layers that are the same
computation share one executable: Llama-8B's 32 layers compile once, a Gemma-4 model once per layer kind. XLA's
compile time then stops growing with depth (the whole-model step of Llama-8B took 8.9 s to compile on an H200, one
layer 1.8 s), and the stages are what the layer-by-layer driver builds on.

Each stage's quantizer statistics (amax) stay on the device and are donated from call to call; a running "all
finite" flag travels through the stages of a batch. ``StagedStep`` works on real arrays and on
``ShapeDtypeStruct`` leaves alike, so ``calibration.ahead`` compiles the same executables from an abstract model
while the weights load.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.quantizer.tensor_quantizer import QuantAmax


def supports_stages(model: Any, forward: Any) -> bool:
    """Whether ``model`` can be calibrated stage by stage: the default forward of a ``CausalLM`` whose text
    model has the stage protocol."""
    from jaxquant.calibration.max import default_forward
    from jaxquant.models.decoder import CausalLM

    text = getattr(model, "model", None)
    return (forward is default_forward and isinstance(model, CausalLM) and type(model).__call__ is CausalLM.__call__
            and all(callable(getattr(text, n, None)) for n in ("prologue", "layer_kwargs", "epilogue"))
            and len(getattr(text, "layers", ())) > 0)


@contextlib.contextmanager
def without_layers(model):
    """``model`` with its text model's layer list emptied (restored on exit): the "shell"."""
    text = model.model
    layers = text.layers
    text.layers = nnx.List([])
    try:
        yield model
    finally:
        text.layers = layers


def _finite(ok, leaves):
    if not leaves:
        return ok
    return ok & jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in leaves])))


class _Part:
    """One module's graph definition and flat (amax, rest) leaves."""

    def __init__(self, module):
        self.graphdef, amax_state, rest = nnx.split(module, QuantAmax, ...)
        self.amax, self.amax_def = jax.tree_util.tree_flatten(amax_state)
        self.rest, self.rest_def = jax.tree_util.tree_flatten(rest)

    def merge(self, amax_leaves, rest_leaves):
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.amax_def, amax_leaves),
                         jax.tree_util.tree_unflatten(self.rest_def, rest_leaves))

    def key(self, kind: str, *inputs) -> Any:
        from jaxquant.calibration.ahead import leaf_signature

        sig = leaf_signature(list(self.amax) + list(self.rest))
        flat, tree = jax.tree_util.tree_flatten(inputs)
        return (kind, self.graphdef, self.amax_def, self.rest_def, sig, tree,
                tuple((tuple(a.shape), str(a.dtype)) for a in flat))

    def amax_state(self):
        return jax.tree_util.tree_unflatten(self.amax_def, self.amax)


def _aval(x):
    return None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)


def avals(tree):
    """``tree`` with every array replaced by its ``ShapeDtypeStruct`` (None kept)."""
    return jax.tree_util.tree_map(_aval, tree)


def on_default_device(leaves: list[Any], mesh=None) -> list[Any]:
    """``leaves`` on the default device: arrays already there as they are, others copied (a model whose parameters
    are kept elsewhere, e.g. host memory beside an accelerator). With a ``mesh``: on the mesh instead (arrays laid
    out over it as they are, others replicated onto it: ``jaxquant.mesh.to_mesh``)."""
    if mesh is not None:
        from jaxquant.mesh import to_mesh

        return to_mesh(mesh, leaves)
    dev = jax.devices()[0]
    if all(not isinstance(x, jax.Array) or x.sharding.device_set == {dev} for x in leaves):
        return leaves
    return jax.device_put(leaves, dev)


class StagedStep:
    """The stage-by-stage calibration step of one model (quantizer modes already set).

    ``compile(ids_shape, has_mask)`` compiles (or finds in ``calibration.ahead``'s store) every stage for that
    batch shape; ``run(ids, mask)`` runs one batch and returns its device "all finite" flag; ``write_back()``
    hands the model its live amax arrays (they are donated between calls).
    """

    def __init__(self, model, mesh=None):
        self.model = model
        self.text = model.model
        self.mesh = mesh
        with without_layers(model) as shell:
            self.shell = _Part(shell)
        self.layers = [_Part(layer) for layer in self.text.layers]
        if mesh is not None:  # statistics replicated over the mesh (so each call's outputs match its inputs)
            from jaxquant.mesh import replicate

            for part in [self.shell, *self.layers]:
                part.amax = replicate(mesh, part.amax)
        self.carried = tuple(getattr(self.text, "carried_kwargs", ()))
        self._exe: dict[tuple, dict] = {}

    def _settle(self, out):
        """A stage's outputs; with a mesh on the CPU backend, waited for (``jaxquant.mesh.settle``)."""
        if self.mesh is None:
            return out
        from jaxquant.mesh import settle

        return settle(out)

    def _avals(self, tree):
        """``avals`` of ``tree``; with a mesh, each keeps its array's sharding (what the executable is compiled for)."""
        if self.mesh is None:
            return avals(tree)
        return jax.tree_util.tree_map(
            lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            tree)

    def _batch_avals(self, tree, batch: int):
        """Activation / context avals: with a mesh, rows split as ``jaxquant.mesh.batch_sharding`` says."""
        if self.mesh is None:
            return tree
        from jaxquant.mesh import batch_tree_sharding

        shardings = batch_tree_sharding(self.mesh, tree, batch)
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    # ------------------------------------------------------------------ the stage functions (traced)
    def _prologue_fn(self):
        from jaxquant.mesh import compute_shardings, constrain, constrain_batch, constrain_replicated

        shell, mesh = self.shell, self.mesh
        rest_sh = compute_shardings(mesh, shell.rest)

        def prologue(amax, rest, ids, mask):
            m = shell.merge(amax, constrain(rest, rest_sh))
            x, ctx = m.model.prologue(ids, mask)
            new = constrain_replicated(mesh, jax.tree_util.tree_leaves(nnx.state(m, QuantAmax)))
            x, ctx = constrain_batch(mesh, (x, ctx), ids.shape[0])
            return x, ctx, new, constrain_replicated(mesh, _finite(jnp.bool_(True), new))

        return jax.jit(prologue, donate_argnums=(0,))

    def _layer_fn(self, part: _Part):
        from jaxquant.mesh import compute_shardings, constrain, constrain_batch, constrain_replicated

        carried, mesh = self.carried, self.mesh
        rest_sh = compute_shardings(mesh, part.rest)

        def layer(amax, rest, ok, x, kwargs):
            m = part.merge(amax, constrain(rest, rest_sh))
            y = m(x, **kwargs)
            new = constrain_replicated(mesh, jax.tree_util.tree_leaves(nnx.state(m, QuantAmax)))
            y, out = constrain_batch(mesh, (y, {k: kwargs[k] for k in carried}), x.shape[0])
            return y, out, new, constrain_replicated(mesh, _finite(ok, new))

        return jax.jit(layer, donate_argnums=(0,))

    def _epilogue_fn(self):
        from jaxquant.mesh import compute_shardings, constrain, constrain_replicated

        shell, mesh = self.shell, self.mesh
        rest_sh = compute_shardings(mesh, shell.rest)

        def epilogue(amax, rest, ok, x, token_mask):
            m = shell.merge(amax, constrain(rest, rest_sh))
            m.logits(m.model.epilogue(x), token_mask)  # the head's input quantizer sees what the full model gives it
            new = constrain_replicated(mesh, jax.tree_util.tree_leaves(nnx.state(m, QuantAmax)))
            return new, constrain_replicated(mesh, _finite(ok, new))

        return jax.jit(epilogue, donate_argnums=(0,))

    # ------------------------------------------------------------------ compilation
    def _job(self, part: _Part, kind: str, fn, *inputs):
        """``(store key, lower)`` of one stage for ``ahead.compile_all``; ``inputs``: the avals after (amax, rest)."""
        return part.key(kind, *inputs), lambda: fn.lower(self._avals(part.amax), self._avals(part.rest), *inputs)

    def _plan(self, ids_shape: tuple[int, int], has_mask: bool) -> tuple[list, list[int]]:
        """The compile jobs for ``[B, S]`` batches (prologue first, epilogue last, one per distinct layer between)
        and, per layer, the index of its job."""
        b = ids_shape[0]
        ids = self._batch_avals(jax.ShapeDtypeStruct(tuple(ids_shape), jnp.int32), b)
        mask = ids if has_mask else None
        ok = self._batch_avals(jax.ShapeDtypeStruct((), jnp.bool_), b)
        pro_fn = self._prologue_fn()
        jobs = [self._job(self.shell, "prologue", pro_fn, ids, mask)]
        x, ctx, _, _ = jax.eval_shape(pro_fn, self._avals(self.shell.amax), self._avals(self.shell.rest), ids, mask)
        x, ctx = self._batch_avals((x, ctx), b)
        layer_jobs = []
        seen: list[tuple[Any, int, Any]] = []  # (key, job index, output avals) of the distinct layers so far
        for i, part in enumerate(self.layers):
            kwargs = self._batch_avals(jax.eval_shape(lambda c, i=i: self.text.layer_kwargs(i, c), ctx), b)
            key = part.key("layer", ok, x, kwargs)
            hit = next((h for h in seen if h[0] == key), None)
            if hit is None:  # equal key = equal graph and input shapes, hence equal output shapes: trace once
                fn = self._layer_fn(part)
                jobs.append(self._job(part, "layer", fn, ok, x, kwargs))
                y, carried, _, _ = jax.eval_shape(fn, self._avals(part.amax), self._avals(part.rest), ok, x, kwargs)
                hit = (key, len(jobs) - 1, self._batch_avals((y, carried), b))
                seen.append(hit)
            layer_jobs.append(hit[1])
            y, carried = hit[2]
            ctx = {**ctx, **carried}
            x = y
        token_mask = self._batch_avals(jax.ShapeDtypeStruct(tuple(ids_shape), jnp.bool_), b) if has_mask else None
        jobs.append(self._job(self.shell, "epilogue", self._epilogue_fn(), ok, x, token_mask))
        return jobs, layer_jobs

    def compile_jobs(self, ids_shape: tuple[int, int], has_mask: bool) -> list:
        """``[(store key, lower)]`` of every stage, for ``ahead.compile_all`` (which compiles them together)."""
        return self._plan(ids_shape, has_mask)[0]

    def compile(self, ids_shape: tuple[int, int], has_mask: bool) -> int:
        """Compile every stage for ``[B, S]`` batches (with or without a mask), or find them in
        ``calibration.ahead``'s store; distinct stages compile on several threads. Returns how many distinct
        executables the model needs for this shape."""
        from jaxquant.calibration.ahead import compile_all

        shape_key = (tuple(ids_shape), has_mask)
        if shape_key not in self._exe:
            jobs, layer_jobs = self._plan(ids_shape, has_mask)
            exes = compile_all(jobs)
            self._exe[shape_key] = {"prologue": exes[0], "layers": [exes[j] for j in layer_jobs],
                                    "epilogue": exes[-1]}
        e = self._exe[shape_key]
        return len({id(x) for x in [e["prologue"], e["epilogue"], *e["layers"]]})

    # ------------------------------------------------------------------ running
    def run(self, ids: jax.Array, mask: jax.Array | None) -> jax.Array:
        """One calibration batch through every stage; returns the batch's "all amax finite" flag (on device)."""
        x, ctx, ok = self.run_prologue(ids, mask)
        for i in range(len(self.layers)):
            x, ctx, ok = self.run_layer(i, x, ctx, ok)
        return self.run_epilogue(x, ctx, ok)

    def _executables(self, shape: tuple[int, ...], has_mask: bool) -> dict:
        return self._exe[(tuple(shape), has_mask)]

    def run_prologue(self, ids: jax.Array, mask: jax.Array | None, rest=None) -> tuple[jax.Array, dict, jax.Array]:
        """``(x [B, S, hidden], ctx, ok)`` of one batch (``compile`` first); updates the shell's amax. ``rest``: the
        shell's non-amax leaves to use instead of its own (e.g. copies staged on the device)."""
        shell = self.shell
        x, ctx, shell.amax, ok = self._settle(self._executables(ids.shape, mask is not None)["prologue"](
            shell.amax, shell.rest if rest is None else rest, ids, mask))
        return x, ctx, ok

    def run_layer(self, i: int, x: jax.Array, ctx: dict, ok: jax.Array, rest=None) -> tuple[jax.Array, dict, jax.Array]:
        """Layer ``i`` on one batch's ``x``: ``(output, ctx with what the layer carries forward, ok)``; updates the
        layer's amax. ``rest``: its non-amax leaves to use instead of its own."""
        part = self.layers[i]
        shape = ctx["token_mask"].shape if ctx.get("token_mask") is not None else x.shape[:2]
        exe = self._executables(shape, ctx.get("token_mask") is not None)["layers"][i]
        x, carried, part.amax, ok = self._settle(exe(part.amax, part.rest if rest is None else rest, ok, x,
                                                     self.text.layer_kwargs(i, ctx)))
        return x, ({**ctx, **carried} if carried else ctx), ok

    def run_epilogue(self, x: jax.Array, ctx: dict, ok: jax.Array, rest=None) -> jax.Array:
        """The head on one batch's last-layer output; updates the shell's amax; returns ``ok``."""
        shell = self.shell
        shape = ctx["token_mask"].shape if ctx.get("token_mask") is not None else x.shape[:2]
        shell.amax, ok = self._settle(self._executables(shape, ctx.get("token_mask") is not None)["epilogue"](
            shell.amax, shell.rest if rest is None else rest, ok, x, ctx["token_mask"]))
        return ok

    def refresh(self, i: int) -> None:
        """Re-read decoder layer ``i``'s state from the model, after its parameters were loaded or dropped or its
        weight amax set (the streamed layerwise path, ``calibration.streaming``)."""
        self.layers[i] = _Part(self.text.layers[i])

    def amax_leaves(self) -> list[jax.Array]:
        """Every live amax array (to wait on)."""
        return list(self.shell.amax) + [a for p in self.layers for a in p.amax]

    def write_back(self) -> None:
        """Put the live amax arrays back into the model's quantizers."""
        with without_layers(self.model) as shell:
            nnx.update(shell, self.shell.amax_state())
        for layer, part in zip(self.text.layers, self.layers):
            nnx.update(layer, part.amax_state())


__all__ = ["StagedStep", "avals", "on_default_device", "supports_stages", "without_layers"]
