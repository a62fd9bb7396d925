"""The tokenizer served by a child process (jaxquant.tokenizer): the same ids and special tokens as load_tokenizer in
this process, the same errors, and the same jaxquant ptq export."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_cli import cli_files  # noqa: E402
from assets import smollm2_hf_dir  # noqa: E402

from jaxquant.cli import main  # noqa: E402
from jaxquant.data.batching import pack_rows, tokenize_padded  # noqa: E402
from jaxquant.errors import CheckpointError  # noqa: E402
from jaxquant.tokenizer import ATTRS, RemoteTokenizer, TokenizerProcess, load_tokenizer, tokenizer_via_process  # noqa: E402

TEXTS = ["The river runs north of the city.", "  leading spaces and émoji 🙂 in\ttabs\n\nand blank lines  ",
         "x" * 3000, "Short.", "Numbers 12345 67890 and symbols <>&;"]


@pytest.fixture(scope="module")
def smol_remote():
    proc = TokenizerProcess(smollm2_hf_dir())
    tok = tokenizer_via_process(proc)
    yield tok
    proc.close()


def test_child_gives_the_same_ids_and_special_tokens(smol_remote):
    assert isinstance(smol_remote, RemoteTokenizer)
    local = load_tokenizer(smollm2_hf_dir())
    for k in ATTRS:
        assert getattr(smol_remote, k) == getattr(local, k), k
    for kwargs in ({}, {"add_special_tokens": False}, {"padding": False, "truncation": True, "max_length": 16}):
        assert smol_remote(TEXTS, **kwargs)["input_ids"] == local(TEXTS, **kwargs)["input_ids"], kwargs
        assert smol_remote(TEXTS[0], **kwargs)["input_ids"] == local(TEXTS[0], **kwargs)["input_ids"], kwargs
    # the calibration rows built from either are the same arrays
    for build in (lambda t: tokenize_padded(TEXTS, t, 24, 4), lambda t: pack_rows(TEXTS * 4, t, 16, 3)):
        a, b = build(smol_remote), build(local)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # anything else comes from a tokenizer loaded here
    assert smol_remote.decode(local(TEXTS[0])["input_ids"]) == local.decode(local(TEXTS[0])["input_ids"])


def test_a_refused_tokenizer_raises_the_same_error(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    proc = TokenizerProcess(d)
    with pytest.raises(CheckpointError, match="never runs checkpoint code"):
        tokenizer_via_process(proc)


@pytest.mark.parametrize("extra", [[], ["--layerwise"]], ids=["whole", "streamed"])
def test_ptq_export_is_the_same_with_the_child(tmp_path, capsys, monkeypatch, extra):
    files = cli_files(tmp_path)
    out = {}
    served = []
    request = TokenizerProcess.request
    monkeypatch.setattr(TokenizerProcess, "request",
                        lambda self, text, kwargs: served.append(1) or request(self, text, kwargs))
    for env in ("0", "1"):
        monkeypatch.setenv("JAXQUANT_TOKENIZER_PROCESS", env)
        d = tmp_path / f"export{env}"
        rc = main(["ptq", "--model", files["model"], "--dataset", files["calib"], "--calib-size", "12",
                   "--calib-seq", "24", "--batch-size", "4", "--quiet", "--export-path", str(d), *extra])
        assert rc == 0, capsys.readouterr().err
        out[env] = {p.name: p.read_bytes() for p in sorted(d.iterdir())}
        assert bool(served) == (env == "1")  # the calibration text went through the child only when asked to
    assert out["0"] == out["1"]
