"""transformers (PyTorch, CPU) as the oracle for jaxquant's decoders. Test-only."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def make_tiny(model_cls, config, directory, *, seed: int = 0, noise: float = 0.2):
    """Build ``model_cls(config)`` with random weights (all params perturbed, norms included) and save it."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(directory)
    return model


def inputs(vocab: int, batch: int = 3, seq: int = 24, *, seed: int = 1, left_pad: tuple[int, ...] = (0, 5, 11)):
    """Random ids and a left-padded mask (row i has ``left_pad[i]`` pads) + HF-style position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(left_pad[:batch]):
        mask[i, :n] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def torch_logits(model, ids, mask, pos) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().numpy()


def jax_logits(model, ids, mask) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32)))


def rel_diff(ours: np.ndarray, ref: np.ndarray, mask) -> tuple[float, float]:
    """(max |diff| over unmasked positions, max |logit| of the reference there)."""
    m = mask.numpy().astype(bool)
    return float(np.abs(ours - ref)[m].max()), float(np.abs(ref[m]).max())


PARITY_TOL = 1e-4
"""Largest max|logit diff| allowed, relative to the reference's max|logit| (fp32, unmasked positions)."""


def check_parity(ref_model, directory, *, seq: int = 24, logits_fn=torch_logits):
    """Load ``directory`` with jaxquant (fp32) and compare its logits with ``ref_model``'s on a
    left-padded batch; returns ``(loaded, max_diff, max_logit)``."""
    import jax.numpy as jnp

    from jaxquant.converters import load_hf

    loaded = load_hf(directory, dtype=jnp.float32)
    ids, mask, pos = inputs(loaded.config.vocab_size, seq=seq)
    ref = logits_fn(ref_model, ids, mask, pos)
    ours = jax_logits(loaded.model, ids, mask)
    diff, top = rel_diff(ours, ref, mask)
    assert diff <= PARITY_TOL * top, f"max diff {diff:.3g} vs max logit {top:.3g}"
    return loaded, diff, top
