"""Perplexity layer by layer: every window batch through the prologue, then decoder layer 0 over all batches, ...,
then the head and the loss (``CausalLM.nll_of_hidden``), with one decoder layer's parameters on the device at a time.

For a model whose parameters are kept elsewhere (``jaxquant ptq --layerwise`` beside an accelerator: host memory),
each stage's parameters are copied to the device once for all batches and dropped after it. The computation is the
model's own (``StagedTextModel``'s stages, quantizers in whatever mode they are), split into jitted stages; equal
layers share one executable.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxquant.eval.perplexity import PerplexityResult, fixed_batches, reduce_nll


def _avals(tree):
    return jax.tree_util.tree_map(lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


class _Stage:
    """One module (the shell or a layer): graph definition, flat state leaves, and the key of its executables."""

    def __init__(self, module):
        self.graphdef, state = nnx.split(module)
        self.leaves, self.treedef = jax.tree_util.tree_flatten(state)

    def merge(self, leaves):
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, leaves))

    def key(self, kind: str, *args) -> tuple:
        flat, tree = jax.tree_util.tree_flatten(_avals(args))
        return (kind, self.graphdef, self.treedef, tuple((tuple(x.shape), str(x.dtype)) for x in self.leaves),
                tree, tuple((tuple(a.shape), str(a.dtype)) for a in flat))


def perplexity_layerwise(model: Any, token_windows, batch_size: int = 8, *, pad_id: int = 0) -> PerplexityResult:
    """Perplexity of ``token_windows`` (``[N, L]`` ids, all real tokens) computed stage by stage over all batches.

    ``model``: a ``CausalLM`` with the stage protocol (``calibration.stages.supports_stages``). Gives the numbers of
    ``perplexity(None, windows, loss_fn=...)`` over the same model (same computation, split into stages).
    """
    from jaxquant.calibration.ahead import compile_all
    from jaxquant.calibration.layerwise import _on_device
    from jaxquant.calibration.max import default_forward
    from jaxquant.calibration.stages import _without_layers, supports_stages
    from jaxquant.errors import UnsupportedError

    if not supports_stages(model, default_forward):
        raise UnsupportedError("layer-by-layer perplexity needs a causal LM with decoder layers (jaxquant's models).")
    ids = np.asarray(token_windows, dtype=np.int32)
    batches = fixed_batches(ids, np.ones_like(ids), batch_size, pad_id)
    text = model.model
    with _without_layers(model) as shell:
        sh = _Stage(shell)
    layers = [_Stage(layer) for layer in text.layers]
    carried_names = tuple(getattr(text, "carried_kwargs", ()))

    def prologue(leaves, ids, mask):
        return sh.merge(leaves).model.prologue(ids, mask)

    def head(leaves, x, ids, mask):
        m = sh.merge(leaves)
        return m.nll_of_hidden(m.model.epilogue(x), ids, mask)

    def layer_fn(st):
        def f(leaves, x, kwargs):
            y = st.merge(leaves)(x, **kwargs)
            return y, {k: kwargs[k] for k in carried_names}

        return jax.jit(f)

    pro_j, head_j = jax.jit(prologue), jax.jit(head)
    dev_ids = [(jax.device_put(b), jax.device_put(m)) for b, m in batches]
    a_ids, a_mask = _avals(dev_ids[0])
    (pro,) = compile_all([(sh.key("prologue", a_ids, a_mask), lambda: pro_j.lower(_avals(sh.leaves), a_ids, a_mask))])
    rest = _on_device(sh.leaves)
    acts = [pro(rest, b, m) for b, m in dev_ids]  # (x, ctx) per batch
    cache: list[tuple[Any, Any]] = []
    for i, st in enumerate(layers):
        x0, ctx0 = acts[0]
        kw_avals = _avals(jax.eval_shape(lambda c, i=i: text.layer_kwargs(i, c), ctx0))
        key = st.key("layer", _avals(x0), kw_avals)
        exe = next((e for k, e in cache if k == key), None)
        if exe is None:
            fn = layer_fn(st)
            (exe,) = compile_all([(key, lambda fn=fn: fn.lower(_avals(st.leaves), _avals(x0), kw_avals))])
            cache.append((key, exe))
        leaves = _on_device(st.leaves)
        nxt = []
        for x, ctx in acts:
            y, carried = exe(leaves, x, text.layer_kwargs(i, ctx))
            nxt.append((y, {**ctx, **carried} if carried else ctx))
        acts = nxt
        del leaves
    x0 = acts[0][0]
    (hd,) = compile_all([(sh.key("head", _avals(x0), a_ids, a_mask),
                          lambda: head_j.lower(_avals(sh.leaves), _avals(x0), a_ids, a_mask))])
    out = [hd(rest, x, b, m) for (x, _), (b, m) in zip(acts, dev_ids)]
    return reduce_nll([s for s, _ in out], [c for _, c in out])


__all__ = ["perplexity_layerwise"]
