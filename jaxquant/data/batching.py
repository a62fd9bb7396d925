"""Calibration batches formed exactly as hf_ptq forms them, as fixed-shape numpy int32 arrays.

Default (hf_ptq, ``pack=False``): the first N non-empty texts are tokenized together with the tokenizer's own
settings (special tokens, truncation side) with ``truncation=True, max_length=calib_seq`` and padded on the **left**
to the longest sample of the whole set (``padding=True``), with ``pad_token = eos_token`` when the tokenizer has no
pad token; ``attention_mask`` marks the real tokens. The caller's tokenizer is never modified: padding is applied
here (left, with that pad id), which gives the same arrays as hf_ptq's tokenizer call -- tests check this against
ModelOpt's ``get_dataset_dataloader``.

Packed (``pack=True``): every text is tokenized with the tokenizer's defaults (``add_special_tokens=True``, so a
tokenizer that adds BOS adds it to each document), documents are joined with EOS into one stream, and the stream is
cut into consecutive rows of exactly ``calib_seq`` tokens (mask all ones). Only full rows are made. (ModelOpt's
``pack=True``, which hf_ptq does not use, tokenizes with ``add_special_tokens=False`` and pads a final partial row;
``add_special_tokens=False`` reproduces its full rows.)

Special tokens: a tokenizer without a pad or EOS token (a byte-level tokenizer with no specials) still calibrates.
``pad_id`` / ``eos_id`` (``config_token_ids(hf_config)``: the model's ``config.json`` ``pad_token_id`` /
``eos_token_id``) are the fallbacks after the tokenizer's own. Padding happens only in left-padded mode (pad id:
tokenizer pad, tokenizer EOS, ``pad_id``, ``eos_id``, in that order); packing needs no pad id and separates
documents with the EOS id if one is known (tokenizer, else ``eos_id``), else with nothing.

Token ids: with ``vocab_size`` (the model's embedding rows) every real token must be ``< vocab_size``
(``check_token_ids``), checked before any forward: an XLA gather clamps an out-of-range id silently.

The rows are then split into batches of ``batch_size`` rows (capped at the number of rows, as hf_ptq does); the last
batch is completed with fully-masked rows (pad id, mask 0) so every batch has one shape and a jitted forward
compiles once. ``CalibBatches.num_rows`` is the number of real rows. Note for consumers: a fully-masked row has no
key to attend to, so attention must use a finite mask value (or ignore those rows) to stay NaN-free, and statistics
must skip masked tokens.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from jaxquant.errors import DataError

log = logging.getLogger("jaxquant.data")

PACK_OVERSAMPLE = 16  # documents loaded per requested row in pack mode (ModelOpt's factor)


@dataclass(frozen=True)
class CalibBatches:
    """Fixed-shape calibration batches: ``input_ids`` / ``attention_mask`` are int32 ``[num_batches, B, L]``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    num_rows: int  # real rows; rows past this index (in flattened order) are fully-masked padding

    @property
    def num_batches(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[2])

    @property
    def num_tokens(self) -> int:
        """Real (unmasked) tokens over all batches."""
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(self.num_batches):
            yield self.input_ids[i], self.attention_mask[i]

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The real rows only, ``[num_rows, L]`` each."""
        L = self.seq_len
        return (self.input_ids.reshape(-1, L)[: self.num_rows], self.attention_mask.reshape(-1, L)[: self.num_rows])


def _first_id(value) -> int | None:
    """A config token id (an int, or a list whose first entry is used, as transformers' generation does)."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if v is not None), None)
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def config_token_ids(hf_config) -> dict[str, int | None]:
    """``{"pad_id", "eos_id", "bos_id"}`` from a model's ``config.json`` dict (``LoadedModel.hf_config``).

    Reads the top level, then ``text_config`` (multimodal checkpoints); a list-valued ``eos_token_id`` gives its
    first id. Missing / null entries are None. Pass ``pad_id`` / ``eos_id`` to ``build_calib_batches`` and
    ``bos_id`` to ``eval_windows`` as the fallbacks of a tokenizer without those tokens.
    """
    hf_config = hf_config or {}
    text = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), dict) else {}
    out: dict[str, int | None] = {}
    for key, name in (("pad_id", "pad_token_id"), ("eos_id", "eos_token_id"), ("bos_id", "bos_token_id")):
        v = _first_id(hf_config.get(name))
        out[key] = v if v is not None else _first_id(text.get(name))
    return out


def _tokenizer_id(tokenizer, attr: str) -> int | None:
    v = getattr(tokenizer, attr, None)
    return None if v is None else int(v)


def pad_token_id(tokenizer, pad_id: int | None = None, eos_id: int | None = None) -> int:
    """The id left padding uses: the tokenizer's pad id, else its EOS id (hf_ptq's ``pad_token = eos_token``), else
    the fallbacks ``pad_id`` then ``eos_id`` (the model's config.json, see ``config_token_ids``)."""
    for pid in (_tokenizer_id(tokenizer, "pad_token_id"), _tokenizer_id(tokenizer, "eos_token_id"), pad_id, eos_id):
        if pid is not None:
            return int(pid)
    raise DataError(
        "left-padded calibration needs a pad id, but the tokenizer has neither a pad token nor an EOS token and "
        "the model's config.json names no pad_token_id / eos_token_id. Use --pack (packed rows need no padding), "
        "or set \"pad_token\" in the checkpoint's tokenizer_config.json (or pad_token_id in config.json)."
    )


def eos_token_id(tokenizer, eos_id: int | None = None) -> int | None:
    """The document separator of packed rows: the tokenizer's EOS id, else ``eos_id``, else None (no separator)."""
    tid = _tokenizer_id(tokenizer, "eos_token_id")
    return tid if tid is not None else (None if eos_id is None else int(eos_id))


def check_token_ids(ids, vocab_size: int | None, *, mask=None, what: str = "calibration data") -> None:
    """Raise ``DataError`` when a token id of ``ids`` is outside ``[0, vocab_size)``.

    ``mask`` (same shape; nonzero = real token) limits the check to real tokens (padding positions are never
    embedded into anything that is measured). ``what`` names the data in the message. ``vocab_size`` None skips
    the check. Call it before any forward: XLA's gathers clamp out-of-range ids silently, so a tokenizer larger than
    the model's embedding would calibrate and evaluate on the wrong embedding rows without any error.
    """
    if vocab_size is None:
        return
    a = np.asarray(ids)
    if a.size == 0:
        return
    if mask is not None:
        m = np.asarray(mask) != 0
        if m.shape != a.shape:
            raise DataError(f"{what}: attention mask shape {m.shape} does not match the token ids {a.shape}.")
        a = a[m]
        if a.size == 0:
            return
    hi, lo = int(a.max()), int(a.min())
    if hi >= int(vocab_size) or lo < 0:
        bad = hi if hi >= int(vocab_size) else lo
        n_bad = int(np.count_nonzero((a >= int(vocab_size)) | (a < 0)))
        raise DataError(
            f"{what}: token id {bad} is outside the model's vocabulary (vocab_size {int(vocab_size)}; max id {hi}, "
            f"{n_bad} token(s) out of range). The tokenizer does not match the model's embedding: use the "
            "checkpoint's own tokenizer files, or a checkpoint whose config.json vocab_size covers every id the "
            "tokenizer produces."
        )


def _check_sizes(calib_size: int | None, calib_seq: int) -> None:
    if calib_size is not None and calib_size <= 0:
        raise DataError(f"calib_size must be positive, got {calib_size}.")
    if calib_seq <= 0:
        raise DataError(f"calib_seq must be positive, got {calib_seq}.")


def _non_empty(texts: Sequence[str]) -> list[str]:
    return [t for t in texts if isinstance(t, str) and t.strip()]


def tokenize_padded(
    texts: Sequence[str],
    tokenizer,
    calib_seq: int = 512,
    calib_size: int | None = None,
    *,
    pad_to_max_length: bool = False,
    pad_id: int | None = None,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """hf_ptq's default rows: first ``calib_size`` texts, truncated to ``calib_seq``, left-padded to the longest.

    Returns int32 ``input_ids`` and ``attention_mask`` of shape ``[N, L]`` with ``L = max length <= calib_seq``
    (``L = calib_seq`` with ``pad_to_max_length``). The pad id is ``pad_token_id(tokenizer, pad_id, eos_id)``.
    """
    _check_sizes(calib_size, calib_seq)
    texts = _non_empty(texts)
    if calib_size is not None:
        texts = texts[:calib_size]
    if not texts:
        raise DataError("no calibration text: every sample is empty.")
    pad = pad_token_id(tokenizer, pad_id, eos_id)
    enc = tokenizer(list(texts), padding=False, truncation=True, max_length=calib_seq)
    seqs = enc["input_ids"]
    L = calib_seq if pad_to_max_length else max(len(s) for s in seqs)
    ids = np.full((len(seqs), L), pad, dtype=np.int32)
    mask = np.zeros((len(seqs), L), dtype=np.int32)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = s
            mask[i, L - len(s):] = 1
    return ids, mask


def pack_rows(
    texts: Sequence[str],
    tokenizer,
    calib_seq: int = 512,
    calib_size: int | None = None,
    *,
    add_special_tokens: bool = True,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows: documents tokenized (tokenizer defaults), joined with EOS, cut into full ``calib_seq`` rows.

    The separator is the tokenizer's EOS id, else ``eos_id`` (config.json's), else none (documents are simply
    concatenated). Returns ``calib_size`` rows (all rows the text fills when None; fewer, with a warning, if the
    text runs out).
    """
    _check_sizes(calib_size, calib_seq)
    texts = _non_empty(texts)
    if not texts:
        raise DataError("no calibration text: every sample is empty.")
    eos = eos_token_id(tokenizer, eos_id)
    need = None if calib_size is None else calib_size * calib_seq
    stream: list[int] = []
    chunk = 64
    for start in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[start:start + chunk]), add_special_tokens=add_special_tokens)
        for ids in enc["input_ids"]:
            stream.extend(ids)
            if eos is not None and (not add_special_tokens or not ids or ids[-1] != eos):
                stream.append(eos)
        if need is not None and len(stream) >= need:
            break
    n_full = len(stream) // calib_seq
    if calib_size is not None:
        if n_full < calib_size:
            log.warning("pack: the text fills %d rows of %d tokens, fewer than the %d requested.",
                        n_full, calib_seq, calib_size)
        n_full = min(n_full, calib_size)
    if n_full == 0:
        raise DataError(
            f"pack: the calibration text has {len(stream)} tokens, less than one row of calib_seq={calib_seq}; "
            "use more text or a shorter --calib-seq."
        )
    ids = np.asarray(stream[: n_full * calib_seq], dtype=np.int32).reshape(n_full, calib_seq)
    return ids, np.ones_like(ids)


def make_batches(input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int, pad_id: int = 0) -> CalibBatches:
    """Split ``[N, L]`` rows into ``ceil(N / B)`` batches of ``B = min(batch_size, N)`` rows; the last batch is
    completed with fully-masked rows (``pad_id``, mask 0)."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}.")
    input_ids = np.asarray(input_ids, dtype=np.int32)
    attention_mask = np.asarray(attention_mask, dtype=np.int32)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise DataError(f"expected input_ids and attention_mask of one [N, L] shape, got {input_ids.shape} and "
                        f"{attention_mask.shape}.")
    n, L = input_ids.shape
    if n == 0:
        raise DataError("no calibration rows.")
    b = min(batch_size, n)
    nb = -(-n // b)
    extra = nb * b - n
    if extra:
        input_ids = np.concatenate([input_ids, np.full((extra, L), pad_id, dtype=np.int32)])
        attention_mask = np.concatenate([attention_mask, np.zeros((extra, L), dtype=np.int32)])
    return CalibBatches(input_ids.reshape(nb, b, L), attention_mask.reshape(nb, b, L), n)


def calib_batches(
    texts: Sequence[str],
    tokenizer,
    calib_size: int | None = None,
    calib_seq: int = 512,
    batch_size: int = 1,
    *,
    pack: bool = False,
    pad_to_max_length: bool = False,
    add_special_tokens: bool = True,
    pad_id: int | None = None,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> CalibBatches:
    """Texts -> fixed-shape batches (hf_ptq's padded rows, or packed rows with ``pack=True``).

    ``pad_id`` / ``eos_id``: fallbacks for a tokenizer without pad / EOS tokens (see the module docstring).
    ``vocab_size``: the model's; a real token id ``>= vocab_size`` is a ``DataError`` (``check_token_ids``).
    """
    if pack:
        ids, mask = pack_rows(texts, tokenizer, calib_seq, calib_size, add_special_tokens=add_special_tokens,
                              eos_id=eos_id)
        # the filler rows completing the last batch are fully masked: any id in range will do
        candidates = (_tokenizer_id(tokenizer, "pad_token_id"), _tokenizer_id(tokenizer, "eos_token_id"), pad_id,
                      eos_id)
        fill = next((int(c) for c in candidates if c is not None and (vocab_size is None or 0 <= c < vocab_size)), 0)
    else:
        ids, mask = tokenize_padded(texts, tokenizer, calib_seq, calib_size, pad_to_max_length=pad_to_max_length,
                                    pad_id=pad_id, eos_id=eos_id)
        fill = pad_token_id(tokenizer, pad_id, eos_id)
    check_token_ids(ids, vocab_size, mask=mask, what="calibration data")
    return make_batches(ids, mask, batch_size, fill)


def build_calib_batches(
    dataset: str | Sequence[str] | None,
    tokenizer,
    calib_size: int | str | Sequence[int] = 1024,
    calib_seq: int = 512,
    batch_size: int = 1,
    *,
    pack: bool = False,
    split: str | None = None,
    field: str | None = None,
    pad_to_max_length: bool = False,
    pad_id: int | None = None,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> CalibBatches:
    """``--dataset`` / ``--dataset-field`` / ``--calib-size`` / ``--calib-seq`` / ``--batch-size`` / ``--pack`` ->
    CalibBatches.

    ``dataset`` None is the built-in default (``lee_news``). ``calib_size`` follows hf_ptq (int, or one count per
    dataset as a list / comma string); it counts rows. In pack mode ``PACK_OVERSAMPLE`` documents are read per row
    and the documents of several datasets are shuffled together with ``random.Random(0)``, as ModelOpt does.
    ``field`` names the text column of json / jsonl / parquet / hub records (``--dataset-field``).
    ``pad_id`` / ``eos_id`` are the fallbacks for a tokenizer without pad / EOS tokens (the model's config.json,
    from ``config_token_ids(hf_config)``); ``vocab_size`` (the model's) makes an id outside the embedding a
    ``DataError`` before any forward.
    """
    from jaxquant.data.builtin import DEFAULT_CALIB_DATASET
    from jaxquant.data.sources import expand_datasets, load_texts

    spec = DEFAULT_CALIB_DATASET if dataset is None else dataset
    pairs = expand_datasets(spec, calib_size)
    total = sum(c for _, c in pairs)
    items = [item for item, _ in pairs]
    counts = [c * (PACK_OVERSAMPLE if pack else 1) for _, c in pairs]
    texts: list[str] = []
    for item, count in zip(items, counts):
        texts += load_texts(item, count, split, field=field, warn_short=not pack)
    if pack and len(items) > 1:
        random.Random(0).shuffle(texts)
    return calib_batches(texts, tokenizer, total, calib_seq, batch_size, pack=pack,
                         pad_to_max_length=pad_to_max_length, pad_id=pad_id, eos_id=eos_id, vocab_size=vocab_size)
