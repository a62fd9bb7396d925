"""Batch formation against ModelOpt's own get_dataset_dataloader (run offline on local .jsonl files).

ModelOpt reads a local .jsonl without the `datasets` package through its legacy ``text``-field reader, so
``get_dataset_dataloader`` runs fully offline here; hf_ptq's tokenizer set-up (``get_tokenizer``: left padding,
``pad_token = eos_token`` when missing) is applied to a copy of the tokenizer before it is handed to ModelOpt.
"""

import copy
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from assets import smollm2_hf_dir  # noqa: E402

from jaxquant.data import build_calib_batches, calib_batches, make_batches, pack_rows, tokenize_padded  # noqa: E402
from jaxquant.errors import DataError  # noqa: E402

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Short.",
    "   ",  # empty after stripping: skipped by both
    "A much longer sample about calibration data. " * 40,  # truncated at calib_seq
    "Numbers 1 2 3 4 5 and symbols <>&; also unicode: caf\u00e9, \u65e5\u672c.",
    "Another line\nwith a newline inside.",
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_hf_dir()))


def _no_pad(tok):
    t = copy.deepcopy(tok)
    t.pad_token = None
    assert t.pad_token_id is None and t.eos_token_id is not None
    return t


def _adds_bos(tok):
    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    bos = (t.bos_token, t.bos_token_id)
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos]
    )
    assert t("x").input_ids[0] == bos[1]
    return t


def _modelopt_rows(tok, texts, tmp_path, calib_size, calib_seq):
    dataset_utils = pytest.importorskip("modelopt.torch.utils.dataset_utils")
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    ref_tok = copy.deepcopy(tok)  # hf_ptq's get_tokenizer + padding_side
    ref_tok.padding_side = "left"
    if ref_tok.pad_token is None:
        ref_tok.pad_token = ref_tok.eos_token
    dl = dataset_utils.get_dataset_dataloader(
        str(path), ref_tok, batch_size=1000, num_samples=calib_size, max_sample_length=calib_seq
    )
    (batch,) = list(dl)
    return batch["input_ids"].numpy(), batch["attention_mask"].numpy()


@pytest.mark.parametrize("variant", ["plain", "no_pad_token", "adds_bos"])
@pytest.mark.parametrize("calib_size,calib_seq", [(100, 64), (3, 8), (2, 512)])
def test_padded_rows_match_modelopt(tok, tmp_path, variant, calib_size, calib_seq):
    t = {"plain": tok, "no_pad_token": _no_pad(tok), "adds_bos": _adds_bos(tok)}[variant]
    before = (t.padding_side, t.pad_token, t.truncation_side)
    # ModelOpt's legacy jsonl reader keeps whitespace-only texts; feed it the same non-empty set
    texts = [x for x in TEXTS if x.strip()]
    ref_ids, ref_mask = _modelopt_rows(t, texts, tmp_path, calib_size, calib_seq)
    ids, mask = tokenize_padded(TEXTS, t, calib_seq, calib_size)
    assert (t.padding_side, t.pad_token, t.truncation_side) == before  # caller's tokenizer untouched
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert ids.shape[1] <= calib_seq and mask[:, -1].all()  # left padding: every row ends with a real token


def test_pad_to_max_length(tok):
    ids, mask = tokenize_padded(["a b", "c"], tok, 16, pad_to_max_length=True)
    assert ids.shape == (2, 16) and mask.sum(1).tolist() == [2, 1]
    assert (ids[mask == 0] == tok.pad_token_id).all()


def test_packed_rows_match_modelopt_without_special_tokens(tok):
    dataset_utils = pytest.importorskip("modelopt.torch.utils.dataset_utils")
    texts = [x for x in TEXTS if x.strip()]
    ref_ids, ref_mask = dataset_utils._pack_documents_into_rows(texts, tok, 16, 1000)
    n_full = int(ref_mask.all(dim=1).sum())  # ModelOpt pads a final partial row; we keep full rows only
    ids, mask = pack_rows(texts, tok, 16, None, add_special_tokens=False)
    assert ids.shape == (n_full, 16) and mask.all()
    np.testing.assert_array_equal(ids, ref_ids[:n_full].numpy())


def test_pack_uses_tokenizer_defaults_and_eos_joins(tok):
    t = _adds_bos(tok)
    bos, eos = t.bos_token_id, t.eos_token_id
    docs = ["one two three", "four five"]
    stream = []
    for d in docs:
        stream += [bos] + tok(d, add_special_tokens=False).input_ids + [eos]
    L = 3
    ids, mask = pack_rows(docs, t, L, None)
    n = len(stream) // L
    np.testing.assert_array_equal(ids, np.asarray(stream[: n * L]).reshape(n, L))
    assert mask.all() and mask.dtype == np.int32
    ids2, _ = pack_rows(docs, t, L, 2)
    np.testing.assert_array_equal(ids2, ids[:2])


def test_pack_short_text(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxquant.data"):
        ids, _ = pack_rows(["one two three four five six seven"], tok, 4, 10)
    assert ids.shape[0] < 10 and "fewer than the 10 requested" in caplog.text
    with pytest.raises(DataError, match="less than one row"):
        pack_rows(["hi"], tok, 512, 4)


def test_fixed_shape_batches():
    ids = np.arange(5 * 3, dtype=np.int64).reshape(5, 3)
    mask = np.ones_like(ids)
    b = make_batches(ids, mask, 2, pad_id=7)
    assert (b.num_batches, b.batch_size, b.seq_len, b.num_rows, len(b)) == (3, 2, 3, 5, 3)
    assert b.input_ids.dtype == np.int32
    last_ids, last_mask = list(b)[-1]
    assert last_ids[1].tolist() == [7, 7, 7] and last_mask[1].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(b.rows()[0], ids)
    assert b.num_tokens == 15
    assert make_batches(ids, mask, 64).batch_size == 5  # capped at the number of rows, as hf_ptq does
    with pytest.raises(DataError, match="batch_size"):
        make_batches(ids, mask, 0)


def test_size_errors(tok):
    for bad in (0, -1):
        with pytest.raises(DataError, match="calib_size must be positive"):
            calib_batches(["text"], tok, bad, 16, 1)
    with pytest.raises(DataError, match="every sample is empty"):
        calib_batches(["", "  "], tok, 4, 16, 1)


@needs_gensim
def test_build_from_builtin_default(tok):
    b = build_calib_batches(None, tok, calib_size=10, calib_seq=64, batch_size=4)
    assert (b.num_batches, b.batch_size, b.seq_len, b.num_rows) == (3, 4, 64, 10)
    assert b.attention_mask[:, :, -1].reshape(-1)[:10].all()
    p = build_calib_batches("lee_news", tok, calib_size="6", calib_seq=32, batch_size=4, pack=True)
    assert p.num_rows == 6 and p.attention_mask.reshape(-1, 32)[:6].all()
    two = build_calib_batches("lee_news,wikipedia", tok, calib_size=[3, 2], calib_seq=16, batch_size=8)
    assert two.num_rows == 5
