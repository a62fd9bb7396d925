"""Local dataset files (.txt / .jsonl / .json / .parquet) and the dataset-spec resolution of load_texts."""

import gzip
import importlib.util
import json
import logging

import pytest

from jaxquant.data import files, load_eval_text, load_texts
from jaxquant.data.sources import expand_datasets, match_calib_sizes, parse_calib_sizes
from jaxquant.errors import DataError

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed")


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_txt_paragraphs_lines_and_whole_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("First para\nstill first.\n\n\nSecond para.\n  \nThird.\n")
    assert load_texts(str(p), 10) == ["First para\nstill first.", "Second para.", "Third."]
    assert load_texts(str(p), 2) == ["First para\nstill first.", "Second para."]
    q = tmp_path / "b.txt"
    q.write_text("doc one\ndoc two\r\ndoc three\n")
    assert load_texts(str(q), 10) == ["doc one", "doc two", "doc three"]
    assert files.load_file_texts(p, text_unit="file") == ["First para\nstill first.\n\n\nSecond para.\n  \nThird."]
    assert files.load_file_texts(p, text_unit="line")[:2] == ["First para", "still first."]
    with pytest.raises(DataError, match="text_unit"):
        files.load_file_texts(p, text_unit="sentence")


def test_jsonl_text_messages_prompt_and_field(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"prompt": "P", "completion": "C"},
        {"input": "I", "output": "O"},
        {"text": ""},
        {"text": "last"},
    ])
    assert load_texts(str(p), 100) == ["plain text", "hi\nhello", "q\na", "P\nC", "I\nO", "last"]
    assert load_texts(str(p), 2) == ["plain text", "hi\nhello"]
    q = _jsonl(tmp_path / "e.jsonl", [{"body": "x", "text": "ignored"}, {"body": "y"}])
    assert load_texts(str(q), 5, field="body") == ["x", "y"]
    with pytest.raises(DataError, match=r"e\.jsonl, line 2: field 'nope' not found.*--dataset-field"):
        load_texts(str(_jsonl(tmp_path / "e.jsonl", [{"nope": "a"}, {"body": "y"}])), 5, field="nope")
    with pytest.raises(DataError, match=r"f\.jsonl, line 1: no text column found.*\['id', 'score'\]"):
        load_texts(str(_jsonl(tmp_path / "f.jsonl", [{"id": 1, "score": 2}])), 5)
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"g\.jsonl, line 2: invalid JSON"):
        load_texts(str(bad), 5)


def test_jsonl_is_streamed_first_n(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\nthis line is never parsed\n')
    assert load_texts(str(p), 2) == ["a", "b"]


def test_json_layouts(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"text": "x"}, "y", {"messages": [{"content": "m"}]}]))
    assert load_texts(str(a), 9) == ["x", "y", "m"]
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"data": [{"text": "d1"}, {"text": "d2"}], "version": 1}))
    assert load_texts(str(b), 9) == ["d1", "d2"]
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"text": ["t1", "t2"]}))
    assert load_texts(str(c), 9) == ["t1", "t2"]
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"articles": [{"text": "b1"}, "b2"]}))
    assert load_texts(str(d), 9, field="articles") == ["b1", "b2"]
    e = tmp_path / "e.json"
    e.write_text('{"text": "1"}\n{"text": "2"}\n')
    with pytest.raises(DataError, match=r"e\.json: invalid JSON.*\.jsonl"):
        load_texts(str(e), 9)


def test_compressed_text(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"text": "zipped"}\n')
    assert load_texts(str(p), 3) == ["zipped"]


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"'.*missing\.jsonl' does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"), 3)
    with pytest.raises(DataError, match="does not exist"):
        load_texts("./nowhere/data", 3)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt: the file holds no text"):
        load_texts(str(empty), 3)
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type '\.csv'.*\.jsonl"):
        load_texts(str(odd), 3)
    with pytest.raises(DataError, match="is a directory"):
        files.load_file_texts(tmp_path, 3)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    real = importlib.util.find_spec
    monkeypatch.setattr(files.importlib.util, "find_spec", lambda n, *a: None if n == "pyarrow" else real(n, *a))
    with pytest.raises(DataError, match=r"d\.parquet: .*pip install pyarrow"):
        load_texts(str(p), 3)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed (optional)")
def test_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "", "b", "c"], "id": [1, 2, 3, 4]}), p)
    assert load_texts(str(p), 2) == ["a", "b"]
    assert load_texts(str(p), 9, field="id") == ["1", "2", "3", "4"]


# ---------------------------------------------------------------- spec resolution and hf_ptq's count rules


def test_calib_size_rules():
    assert parse_calib_sizes("512,256") == [512, 256]
    assert match_calib_sizes(3, [512, 256]) == [512, 256, 256]  # padded with the last value
    assert match_calib_sizes(1, "512,256") == [512]  # truncated
    for bad in (0, -4, "12,0", "x"):
        with pytest.raises(DataError, match="calib-size"):
            parse_calib_sizes(bad)
    assert expand_datasets("a.jsonl,lee_news", 10) == [("a.jsonl", 10), ("lee_news", 10)]
    assert expand_datasets("cnn_nemotron_v2_mix", 1025) == [
        ("cnn_dailymail", 513), ("nemotron-post-training-dataset-v2", 512)]
    with pytest.raises(DataError, match="combo"):
        expand_datasets("cnn_nemotron_v2_mix,cnn_dailymail", 8)
    with pytest.raises(DataError, match="empty --dataset"):
        expand_datasets(" , ", 8)


def test_unknown_name_lists_choices():
    with pytest.raises(DataError, match=r"unknown dataset 'nonsense'.*lee_news.*cnn_dailymail"):
        load_texts("nonsense", 3)


@needs_gensim
def test_builtin_specs_and_comma_lists(tmp_path, caplog):
    assert load_texts(None, 3) == load_texts("lee_news", 3) == load_texts("builtin:lee_news", 3)
    p = _jsonl(tmp_path / "x.jsonl", [{"text": "mine"}] * 3)
    mixed = load_texts(f"lee_news,{p}", [2, 5])
    assert mixed[2:] == ["mine"] * 3 and len(mixed) == 5
    with caplog.at_level(logging.WARNING, logger="jaxquant.data"):
        assert len(load_texts("lee_news", 1000)) == 300
    assert "fewer than the 1000 requested" in caplog.text
    assert load_texts("lee_news", 5, split="test")[0] != load_texts("lee_news", 5)[0]


@needs_gensim
def test_eval_text_defaults():
    text = load_eval_text()
    assert text == "\n\n".join(load_texts("wikipedia", 10_000, split="test"))
    assert load_eval_text("lee_news", "test").count("\n\n") == 49
