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

from jaxquant.calibration.stages import avals
from jaxquant.eval.perplexity import PerplexityResult, fixed_batches, reduce_nll


class _Stage:
    """One module (the shell or a layer): graph definition, flat state leaves, and the key of its executables."""

    def __init__(self, module):
        self.graphdef, state = nnx.split(module)
        self.leaves, self.treedef = jax.tree_util.tree_flatten(state)

    def merge(self, leaves):
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, leaves))

    def key(self, kind: str, *args) -> tuple:
        flat, tree = jax.tree_util.tree_flatten(avals(args))
        return (kind, self.graphdef, self.treedef, tuple((tuple(x.shape), str(x.dtype)) for x in self.leaves),
                tree, tuple((tuple(a.shape), str(a.dtype)) for a in flat))


def perplexity_layerwise(model: Any, token_windows, batch_size: int = 8, *, pad_id: int = 0) -> PerplexityResult:
    """Perplexity of ``token_windows`` (``[N, L]`` ids, all real tokens) computed stage by stage over all batches.

    ``model``: a ``CausalLM`` with the stage protocol (``calibration.stages.supports_stages``). Gives the numbers of
    ``perplexity(None, windows, loss_fn=...)`` over the same model (same computation, split into stages).
    """
    from jaxquant.calibration.ahead import compile_all
    from jaxquant.calibration.max import default_forward
    from jaxquant.calibration.stages import on_default_device, supports_stages, without_layers
    from jaxquant.errors import UnsupportedError

    if not supports_stages(model, default_forward):
        raise UnsupportedError("layer-by-layer perplexity needs a causal LM with decoder layers (jaxquant's models).")
    ids = np.asarray(token_windows, dtype=np.int32)
    batches = fixed_batches(ids, np.ones_like(ids), batch_size, pad_id)
    text = model.model
    with without_layers(model) as shell:
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
    a_ids, a_mask = avals(dev_ids[0])
    (pro,) = compile_all([(sh.key("prologue", a_ids, a_mask), lambda: pro_j.lower(avals(sh.leaves), a_ids, a_mask))])
    rest = on_default_device(sh.leaves)
    acts = [pro(rest, b, m) for b, m in dev_ids]  # (x, ctx) per batch
    for i, st in enumerate(layers):
        x0, ctx0 = acts[0]
        kw_avals = avals(jax.eval_shape(lambda c, i=i: text.layer_kwargs(i, c), ctx0))
        key = st.key("layer", avals(x0), kw_avals)  # equal layers: found in the store, compiled once
        (exe,) = compile_all([(key, lambda: layer_fn(st).lower(avals(st.leaves), avals(x0), kw_avals))])
        leaves = on_default_device(st.leaves)
        nxt = []
        for x, ctx in acts:
            y, carried = exe(leaves, x, text.layer_kwargs(i, ctx))
            nxt.append((y, {**ctx, **carried} if carried else ctx))
        acts = nxt
        del leaves
    x0 = acts[0][0]
    (hd,) = compile_all([(sh.key("head", avals(x0), a_ids, a_mask),
                          lambda: head_j.lower(avals(sh.leaves), avals(x0), a_ids, a_mask))])
    out = [hd(rest, x, b, m) for (x, _), (b, m) in zip(acts, dev_ids)]
    return reduce_nll([s for s, _ in out], [c for _, c in out])


__all__ = ["perplexity_layerwise"]
