"""A small greedy ``generate`` for before/after previews (no KV cache).

Each step recomputes the whole sequence at one fixed padded length, so the forward pass compiles
once per (batch, length) and no cache code is needed. Prompts are right-padded into a
``[B, prompt + max_new_tokens]`` buffer; row ``b``'s next token is read at its own last position,
and the attention mask hides everything after it (causal attention never looks right anyway).
Meant for a few dozen tokens of preview; it is O(n^2) in the generated length.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _step_fn(graphdef):
    @jax.jit
    def step(state, ids, mask, last):
        model = nnx.merge(graphdef, state)
        h = model.hidden_states(ids, mask)
        hl = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return jnp.argmax(model.logits(hl), axis=-1).astype(jnp.int32)

    return step


def generate_ids(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 *, eos_token_id: int | Sequence[int] | None = None, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of each token-id prompt; returns only the new ids (stopping at EOS)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    b = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    total = int(lens.max()) + max_new_tokens
    ids = np.full((b, total), pad_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    graphdef, state = nnx.split(model)
    step = _step_fn(graphdef)
    done = np.zeros(b, bool)
    out: list[list[int]] = [[] for _ in range(b)]
    cur = lens.copy()
    for _ in range(max_new_tokens):
        mask = (np.arange(total)[None, :] < cur[:, None]).astype(np.int32)
        nxt = np.asarray(step(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(cur - 1)))
        for i in range(b):
            if done[i]:
                continue
            tok = int(nxt[i])
            out[i].append(tok)
            ids[i, cur[i]] = tok
            cur[i] += 1
            if tok in eos:
                done[i] = True
        if done.all():
            break
    return out


def generate(model: nnx.Module, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 32,
             *, skip_special_tokens: bool = True) -> str | list[str]:
    """Greedy text continuation of ``prompt`` (a string or a list of strings).

    ``tokenizer`` is a transformers tokenizer (``LoadedModel.tokenizer()``). Stops at the
    tokenizer's / config's EOS token.
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    enc = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    new = generate_ids(model, enc, max_new_tokens, eos_token_id=eos, pad_id=pad)
    texts = [tokenizer.decode(t, skip_special_tokens=skip_special_tokens) for t in new]
    return texts[0] if single else texts
