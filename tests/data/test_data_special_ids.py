"""Issue 10: a tokenizer without special tokens still calibrates (config.json's pad/EOS ids are the fallbacks), token
ids outside the model's vocabulary are a DataError before any forward, and ``--dataset-field`` works on the data side.

Every tokenizer and config here is written by tokenizers / transformers (``save_pretrained``) into ``tmp_path`` and
read back the way the CLI reads it (``load_tokenizer``, ``read_hf_config``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_families import byte_level_tokenizer  # noqa: E402

from jaxquant.converters.hf import load_tokenizer, read_hf_config  # noqa: E402
from jaxquant.data import (  # noqa: E402
    build_calib_batches,
    calib_batches,
    check_token_ids,
    config_token_ids,
    pad_token_id,
)
from jaxquant.errors import DataError  # noqa: E402
from jaxquant.eval import eval_windows, perplexity  # noqa: E402

DOCS = ["first document, some words", "second one", "third and last document of the set"]


def _checkpoint(d: Path, **config) -> Path:
    """A byte-level tokenizer with no special tokens next to a llama config.json (both saved by transformers)."""
    import transformers

    d.mkdir(parents=True, exist_ok=True)
    kw = dict(vocab_size=272, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.LlamaConfig(**{**kw, **config}).save_pretrained(d)
    byte_level_tokenizer().save_pretrained(d)
    return d


def _docs_file(tmp_path: Path, n: int = 40) -> Path:
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": f"{DOCS[i % 3]} #{i}"}) + "\n" for i in range(n)))
    return p


def _load(d: Path):
    tok = load_tokenizer(d)
    assert tok.pad_token_id is None and tok.eos_token_id is None and tok.bos_token_id is None
    return tok, read_hf_config(d)


# ------------------------------------------------------------------------------- pad / EOS fallbacks
def test_pack_without_any_special_token_needs_no_padding(tmp_path):
    """Before: --pack raised "set tokenizer.pad_token first". Packing has no padding; without any EOS id the
    documents are simply concatenated."""
    tok, cfg = _load(_checkpoint(tmp_path / "ck"))
    ids = config_token_ids(cfg)
    assert ids == {"pad_id": None, "eos_id": None, "bos_id": None}
    b = build_calib_batches(str(_docs_file(tmp_path)), tok, 3, 16, 2, pack=True, **_calib_ids(ids))
    assert b.num_rows == 3 and b.input_ids.shape == (2, 2, 16)
    stream = "".join(f"{DOCS[i % 3]} #{i}" for i in range(6))  # byte tokenizer: id == byte
    assert bytes(b.rows()[0].reshape(-1).tolist()).decode() == stream[:48]
    assert (b.attention_mask.reshape(-1, 16)[3] == 0).all()  # the filler row completing the last batch is masked


def _calib_ids(ids):
    return {"pad_id": ids["pad_id"], "eos_id": ids["eos_id"]}


def test_pack_separates_documents_with_config_eos(tmp_path):
    tok, cfg = _load(_checkpoint(tmp_path / "ck", eos_token_id=10))
    ids = config_token_ids(cfg)
    assert ids["eos_id"] == 10
    b = build_calib_batches(str(_docs_file(tmp_path)), tok, 2, 16, 2, pack=True, **_calib_ids(ids))
    row = b.rows()[0].reshape(-1).tolist()
    first = list(f"{DOCS[0]} #0".encode())
    assert row[: len(first) + 1] == first + [10]


def test_padded_mode_pads_with_config_pad_then_eos(tmp_path):
    tok, cfg = _load(_checkpoint(tmp_path / "ck", pad_token_id=0, eos_token_id=10))
    b = calib_batches(DOCS, tok, 3, 64, 3, **_calib_ids(config_token_ids(cfg)))
    ids, mask = b.rows()
    assert (ids[mask == 0] == 0).all() and (mask == 0).any()  # left padding with config.json's pad_token_id
    assert (mask[:, -1] == 1).all()  # left padded
    tok2, cfg2 = _load(_checkpoint(tmp_path / "ck2", eos_token_id=[7, 8]))  # list-valued eos: the first id
    b2 = calib_batches(DOCS, tok2, 3, 64, 3, **_calib_ids(config_token_ids(cfg2)))
    ids2, mask2 = b2.rows()
    assert (ids2[mask2 == 0] == 7).all()


def test_padded_mode_without_any_id_says_what_to_do(tmp_path):
    tok, cfg = _load(_checkpoint(tmp_path / "ck"))
    with pytest.raises(DataError, match=r"left-padded calibration needs a pad id.*--pack.*pad_token"):
        calib_batches(DOCS, tok, 3, 64, 3, **_calib_ids(config_token_ids(cfg)))


def test_tokenizer_ids_win_over_config(tmp_path):
    """A tokenizer with its own pad/EOS keeps hf_ptq's behaviour (pad, else EOS) whatever config.json says."""
    tok, _ = _load(_checkpoint(tmp_path / "ck"))
    tok.eos_token = "!"  # id 33
    assert pad_token_id(tok, pad_id=0, eos_id=10) == 33
    b = calib_batches(DOCS, tok, 3, 64, 3, pack=False, pad_id=0, eos_id=10)
    ids, mask = b.rows()
    assert (ids[mask == 0] == 33).all()


def test_config_token_ids_reads_text_config(tmp_path):
    """Multimodal checkpoints keep the ids under text_config (Gemma 3's config.json as transformers writes it)."""
    import transformers

    transformers.Gemma3Config().save_pretrained(tmp_path)
    cfg = read_hf_config(tmp_path)
    assert "eos_token_id" not in cfg
    assert config_token_ids(cfg) == {"pad_id": 0, "eos_id": 1, "bos_id": 2}


def test_eval_windows_uses_config_bos(tmp_path):
    tok, cfg = _load(_checkpoint(tmp_path / "ck", bos_token_id=1))
    w = eval_windows(tok, " ".join(DOCS) * 20, seq_len=8, n_windows=2, bos_id=config_token_ids(cfg)["bos_id"])
    assert w.shape == (2, 9) and (w[:, 0] == 1).all()


# ------------------------------------------------------------------------------- ids >= vocab_size
def test_calibration_ids_outside_the_vocabulary_are_an_error(tmp_path):
    """A tokenizer bigger than the embedding: before, XLA's gather clamped the ids silently."""
    tok, cfg = _load(_checkpoint(tmp_path / "ck", vocab_size=100, eos_token_id=10))
    vocab = cfg["vocab_size"]
    zfile = tmp_path / "z.jsonl"
    zfile.write_text("".join(json.dumps({"text": f"abc xyz {i}"}) + "\n" for i in range(40)))
    for pack in (True, False):
        with pytest.raises(DataError) as e:
            build_calib_batches(str(zfile), tok, 2, 16, 2, pack=pack, vocab_size=vocab,
                                **_calib_ids(config_token_ids(cfg)))
        msg = str(e.value)
        assert "calibration data" in msg and "vocab_size 100" in msg and "max id 122" in msg  # 'z' = 122
        assert "use the checkpoint's own tokenizer" in msg
    # in range: fine (and the check is a no-op without vocab_size)
    b = build_calib_batches(str(_docs_file(tmp_path)), tok, 2, 16, 2, pack=True, vocab_size=256, eos_id=10)
    assert b.num_rows == 2
    build_calib_batches(str(_docs_file(tmp_path)), tok, 2, 16, 2, pack=True, eos_id=10)


def test_padding_ids_are_not_checked_only_real_tokens():
    ids = np.array([[300, 300, 5, 6]])
    check_token_ids(ids, 10, mask=np.array([[0, 0, 1, 1]]))
    with pytest.raises(DataError, match=r"token id 300 .*vocab_size 10; max id 300, 2 token\(s\)"):
        check_token_ids(ids, 10)
    with pytest.raises(DataError, match="token id -1"):
        check_token_ids(np.array([[-1, 2]]), 10, what="x")


def test_eval_ids_outside_the_vocabulary_fail_before_any_forward(tmp_path):
    tok, cfg = _load(_checkpoint(tmp_path / "ck", vocab_size=100))
    text = "abc xyz " * 40
    with pytest.raises(DataError, match=r"evaluation windows: token id 122 .*vocab_size 100; max id 122"):
        eval_windows(tok, text, seq_len=16, n_windows=2, vocab_size=cfg["vocab_size"])
    windows = eval_windows(tok, text, seq_len=16, n_windows=2)  # without vocab_size: no check
    calls = []

    def logits_fn(ids, mask):
        calls.append(ids)
        return np.zeros(ids.shape + (256,), np.float32)  # uniform over 256 ids

    with pytest.raises(DataError, match=r"evaluation windows: .*vocab_size 100"):
        perplexity(logits_fn, windows, batch_size=2, vocab_size=100)
    assert calls == []  # refused before the first forward
    r = perplexity(logits_fn, windows, batch_size=2, vocab_size=256)
    assert np.isclose(r.ppl, 256.0) and calls


# ------------------------------------------------------------------------------- --dataset-field
def test_dataset_field_names_the_text_column(tmp_path):
    """The error advises --dataset-field; the data side takes it as ``field=`` (the CLI passes args.dataset_field)."""
    tok, cfg = _load(_checkpoint(tmp_path / "ck", eos_token_id=10))
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"id": i, "body": f"{DOCS[i % 3]} {i}"}) + "\n" for i in range(30)))
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: no text column found.*--dataset-field"):
        build_calib_batches(str(p), tok, 2, 16, 2, pack=True, eos_id=10)
    b = build_calib_batches(str(p), tok, 2, 16, 2, pack=True, eos_id=10, field="body")
    assert bytes(b.rows()[0][0].tolist()).decode() == f"{DOCS[0]} 0"[:16]


def test_the_advised_flags_exist_and_reach_the_data_layer(tmp_path):
    """The messages advise --dataset-field / --eval-dataset-field: both parse and carry the column name."""
    from jaxquant.cli import build_parser

    tok, _ = _load(_checkpoint(tmp_path / "ck", eos_token_id=10))
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"body": f"{DOCS[i % 3]} {i}"}) + "\n" for i in range(30)))
    args = build_parser().parse_args(["ptq", "--dataset", str(p), "--dataset-field", "body",
                                      "--eval-dataset", str(p), "--eval-dataset-field", "body"])
    assert args.dataset_field == "body" and args.eval_dataset_field == "body"
    b = build_calib_batches(args.dataset, tok, 2, 16, 2, pack=True, eos_id=10, field=args.dataset_field)
    assert b.num_rows == 2
    from jaxquant.data import load_eval_text

    assert load_eval_text(args.eval_dataset, field=args.eval_dataset_field).startswith(DOCS[0])
    e = build_parser().parse_args(["eval", "--eval-dataset", str(p), "--eval-dataset-field", "body"])
    assert e.eval_dataset_field == "body"
