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


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (hf_ptq's ``pad_token = eos_token``)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if pid is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first.")
    return int(pid)


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
) -> tuple[np.ndarray, np.ndarray]:
    """hf_ptq's default rows: first ``calib_size`` texts, truncated to ``calib_seq``, left-padded to the longest.

    Returns int32 ``input_ids`` and ``attention_mask`` of shape ``[N, L]`` with ``L = max length <= calib_seq``
    (``L = calib_seq`` with ``pad_to_max_length``).
    """
    _check_sizes(calib_size, calib_seq)
    texts = _non_empty(texts)
    if calib_size is not None:
        texts = texts[:calib_size]
    if not texts:
        raise DataError("no calibration text: every sample is empty.")
    pad = pad_token_id(tokenizer)
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
) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows: documents tokenized (tokenizer defaults), joined with EOS, cut into full ``calib_seq`` rows.

    Returns ``calib_size`` rows (all rows the text fills when None; fewer, with a warning, if the text runs out).
    """
    _check_sizes(calib_size, calib_seq)
    texts = _non_empty(texts)
    if not texts:
        raise DataError("no calibration text: every sample is empty.")
    eos = getattr(tokenizer, "eos_token_id", None)
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
) -> CalibBatches:
    """Texts -> fixed-shape batches (hf_ptq's padded rows, or packed rows with ``pack=True``)."""
    if pack:
        ids, mask = pack_rows(texts, tokenizer, calib_seq, calib_size, add_special_tokens=add_special_tokens)
    else:
        ids, mask = tokenize_padded(texts, tokenizer, calib_seq, calib_size, pad_to_max_length=pad_to_max_length)
    return make_batches(ids, mask, batch_size, pad_token_id(tokenizer))


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
) -> CalibBatches:
    """``--dataset`` / ``--calib-size`` / ``--calib-seq`` / ``--batch-size`` / ``--pack`` -> CalibBatches.

    ``dataset`` None is the built-in default (``lee_news``). ``calib_size`` follows hf_ptq (int, or one count per
    dataset as a list / comma string); it counts rows. In pack mode ``PACK_OVERSAMPLE`` documents are read per row
    and the documents of several datasets are shuffled together with ``random.Random(0)``, as ModelOpt does.
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
                         pad_to_max_length=pad_to_max_length)
