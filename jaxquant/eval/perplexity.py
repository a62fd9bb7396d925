"""Model-agnostic perplexity with a float32 log-softmax computed on the device.

``perplexity(logits_fn, token_windows, batch_size)`` runs ``logits_fn(input_ids [B, L] int32, attention_mask [B, L]
int32) -> logits [B, L, V]`` batch by batch and reduces each batch's logits to two scalars inside a jitted
function (``token_nll``): the summed next-token negative log-likelihood and the number of scored tokens. When
``logits_fn`` returns a JAX array the full-vocabulary logits therefore stay on the device; only two scalars per batch
reach the host. ``make_loss_fn(logits_fn)`` fuses a traceable ``logits_fn`` with the reduction into one jitted
function (pass it as ``loss_fn=``); a model can also pass its own ``loss_fn(input_ids, attention_mask) -> (nll_sum,
n_tokens)``, e.g. one built on ``chunked_token_nll``, which goes from final hidden states and the LM head to the
loss a few positions at a time and never forms the full ``[B, L, V]`` logits (bounded memory for Gemma's 262k
vocabulary).

Token ``t + 1`` is scored from position ``t`` only when both are real tokens (``attention_mask`` 1 at ``t`` and
``t + 1``): padding is never a target nor a context position. Batches have one fixed shape (the last is completed
with fully-masked rows), so a jitted ``logits_fn`` compiles once.

``eval_windows`` reproduces the protocol of the project's offline-asset measurements: the text is tokenized once
without special tokens, ``n_windows`` non-overlapping windows of ``seq_len`` text tokens are taken starting
``start_frac`` (5%) into the token stream, and BOS is prepended to each window (so ``seq_len`` tokens per window are
scored, the first one predicted from BOS). A tokenizer without a BOS token uses ``bos_id`` (the model's
``config.json`` ``bos_token_id``) when given.

Token ids: ``eval_windows(..., vocab_size=)`` and ``perplexity(..., vocab_size=)`` raise ``DataError`` for an id
outside ``[0, vocab_size)`` before any forward (``jaxquant.data.check_token_ids``): XLA's gathers clamp such ids
silently, so a tokenizer bigger than the model's embedding would otherwise give a finite, wrong perplexity.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.data.batching import check_token_ids
from jaxquant.errors import DataError

log = logging.getLogger("jaxquant.eval")


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float  # summed natural-log NLL over the scored tokens
    n_tokens: int  # scored (target) tokens

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens if self.n_tokens else float("nan")


@jax.jit
def token_nll(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL (float32 log-softmax) and the number of scored tokens of one ``[B, L]`` batch."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:].astype(jnp.int32)
    valid = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - target_logit, 0.0)
    return jnp.sum(nll, dtype=jnp.float32), jnp.sum(valid, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("chunk_size", "softcap"))
def chunked_token_nll(
    hidden: jax.Array,
    head_weight: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    chunk_size: int = 128,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``token_nll`` from final hidden states without forming ``[B, L, V]`` logits.

    ``hidden`` is ``[B, L, H]`` (after the final norm), ``head_weight`` the ``[V, H]`` LM head (HF layout; the
    embedding for tied models). Logits are made ``chunk_size`` positions at a time inside a ``lax.scan`` (peak
    ``[B, chunk_size, V]`` float32), so a 262k vocabulary stays within a bounded memory. ``softcap`` applies
    ``softcap * tanh(logits / softcap)`` (Gemma-2-style final logit soft-capping) when set.
    """
    B, L, H = hidden.shape
    n = L - 1
    pad = -n % chunk_size
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(input_ids[:, 1:].astype(jnp.int32), ((0, 0), (0, pad)))
    valid = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
    k = (n + pad) // chunk_size
    h = h.reshape(B, k, chunk_size, H).swapaxes(0, 1)
    tgt = tgt.reshape(B, k, chunk_size).swapaxes(0, 1)
    valid = valid.reshape(B, k, chunk_size).swapaxes(0, 1)

    def body(acc, xs):
        hc, tc, vc = xs
        logits = jnp.einsum("bch,vh->bcv", hc, head_weight, preferred_element_type=jnp.float32)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        t = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return acc + jnp.sum(jnp.where(vc, lse - t, 0.0)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, tgt, valid))
    return total, jnp.sum(valid, dtype=jnp.int32)


def make_loss_fn(logits_fn: Callable[[jax.Array, jax.Array], jax.Array]):
    """Jit ``logits_fn`` (which must be traceable by JAX) together with ``token_nll``: a fused ``loss_fn``."""

    @jax.jit
    def loss_fn(input_ids, attention_mask):
        return token_nll(logits_fn(input_ids, attention_mask), input_ids, attention_mask)

    return loss_fn


def _to_array(x: Any):
    if isinstance(x, jax.Array | np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor (tests use a torch-backed logits_fn); the package never imports torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def perplexity(
    logits_fn: Callable[[Any, Any], Any] | None,
    token_windows,
    batch_size: int = 8,
    *,
    attention_mask=None,
    loss_fn: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    pad_id: int = 0,
    vocab_size: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``token_windows`` (``[N, L]`` ints, or a list of equal-length windows).

    ``attention_mask`` (``[N, L]``) defaults to all ones. Exactly one of ``logits_fn`` / ``loss_fn`` is used
    (``loss_fn`` wins): ``logits_fn(ids, mask) -> [B, L, V]`` logits, or ``loss_fn(ids, mask) -> (nll_sum,
    n_tokens)``. Each call gets int32 numpy arrays of the fixed shape ``[batch_size, L]``. ``vocab_size`` (the
    model's) makes a real token id outside ``[0, vocab_size)`` a ``DataError`` before the first forward.
    """
    if logits_fn is None and loss_fn is None:
        raise ValueError("perplexity() needs a logits_fn or a loss_fn.")
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}.")
    ids = np.asarray(token_windows, dtype=np.int32)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise DataError(f"token_windows must be a non-empty [N, L >= 2] array of token ids, got shape {ids.shape}.")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int32)
    if mask.shape != ids.shape:
        raise DataError(f"attention_mask shape {mask.shape} does not match token_windows {ids.shape}.")
    check_token_ids(ids, vocab_size, mask=mask, what="evaluation windows")
    if vocab_size is not None and not 0 <= pad_id < vocab_size:
        pad_id = 0  # filler rows are fully masked; keep their ids in range too
    sums, counts = [], []
    for bi, bm in fixed_batches(ids, mask, batch_size, pad_id):
        if loss_fn is not None:
            s, c = loss_fn(bi, bm)
        else:
            s, c = token_nll(_to_array(logits_fn(bi, bm)), bi, bm)
        sums.append(s)
        counts.append(c)
    return reduce_nll(sums, counts)


def fixed_batches(ids: np.ndarray, mask: np.ndarray, batch_size: int, pad_id: int = 0) -> list[tuple[np.ndarray, ...]]:
    """``[N, L]`` windows as ``[(ids, mask)]`` batches of one shape ``[min(batch_size, N), L]``, the last one completed
    with fully-masked ``pad_id`` rows."""
    n, L = ids.shape
    b = min(batch_size, n)
    extra = -n % b
    if extra:
        ids = np.concatenate([ids, np.full((extra, L), pad_id, dtype=np.int32)])
        mask = np.concatenate([mask, np.zeros((extra, L), dtype=np.int32)])
    return [(ids[i:i + b], mask[i:i + b]) for i in range(0, ids.shape[0], b)]


def reduce_nll(sums, counts) -> PerplexityResult:
    """The ``PerplexityResult`` of per-batch ``(nll_sum, n_tokens)`` (summed in float64 on the host)."""
    nll_sum = float(np.sum(np.asarray([np.asarray(s, dtype=np.float64) for s in sums])))
    n_tokens = int(np.sum([int(c) for c in counts]))
    if n_tokens == 0:
        raise DataError("no token to score: every target token is masked.")
    return PerplexityResult(ppl=math.exp(nll_sum / n_tokens), nll_sum=nll_sum, n_tokens=n_tokens)


def eval_windows(
    tokenizer,
    text: str,
    seq_len: int = 512,
    n_windows: int = 4,
    stride: int | None = None,
    start_frac: float = 0.05,
    add_bos: bool = True,
    *,
    bos_id: int | None = None,
    vocab_size: int | None = None,
) -> np.ndarray:
    """``[n, seq_len + 1]`` int32 windows (``[n, seq_len]`` without BOS) cut from ``text``.

    The text is tokenized once without special tokens; window ``i`` holds the ``seq_len`` tokens starting at
    ``int(start_frac * n_tokens) + i * stride`` (``stride`` defaults to ``seq_len``: consecutive, non-overlapping;
    a larger stride spreads the windows out; overlapping windows are refused because they would score tokens twice)
    and gets the tokenizer's BOS prepended when ``add_bos`` (else ``bos_id``, the model's config.json
    ``bos_token_id``; skipped with a warning when neither exists). Fewer windows than asked are returned, with a
    warning, when the text runs out; none is a DataError. With ``vocab_size`` (the model's), an id outside
    ``[0, vocab_size)`` is a DataError naming the max id (``jaxquant.data.check_token_ids``).
    """
    if seq_len <= 0 or n_windows <= 0:
        raise DataError(f"seq_len and n_windows must be positive, got {seq_len} and {n_windows}.")
    stride = seq_len if stride is None else stride
    if stride < seq_len:
        raise DataError(f"stride ({stride}) must be >= seq_len ({seq_len}): overlapping windows score tokens twice.")
    if not 0.0 <= start_frac < 1.0:
        raise DataError(f"start_frac must be in [0, 1), got {start_frac}.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    if add_bos and bos is None and bos_id is not None:
        bos = int(bos_id)
    if add_bos and bos is None:
        log.warning("neither the tokenizer nor the model's config names a BOS token; evaluation windows start "
                    "without one.")
    start = int(start_frac * len(ids))
    windows = []
    for i in range(n_windows):
        s = start + i * stride
        w = ids[s:s + seq_len]
        if len(w) < seq_len:
            break
        windows.append(([bos] if bos is not None else []) + list(w))
    if not windows:
        raise DataError(
            f"the evaluation text has {len(ids)} tokens: not enough for one window of {seq_len} tokens starting "
            f"{start_frac:.0%} in. Use a longer text or a shorter sequence length."
        )
    if len(windows) < n_windows:
        log.warning("the evaluation text gives %d windows of %d tokens, fewer than the %d requested.",
                    len(windows), seq_len, n_windows)
    out = np.asarray(windows, dtype=np.int32)
    check_token_ids(out, vocab_size, what="evaluation windows")
    return out
