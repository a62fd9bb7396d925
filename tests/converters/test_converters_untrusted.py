"""Issue 10: the loader never runs checkpoint code, recognizes quantized checkpoints, and raises the package's errors.

Every checkpoint here is written by transformers / tokenizers themselves (``save_pretrained``) in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_families import byte_level_tokenizer, write_tiny_family  # noqa: E402

from jaxquant.converters.hf import UnsupportedDtypeError, load_hf, load_tokenizer, resolve_dtype  # noqa: E402
from jaxquant.errors import CheckpointError, JaxquantError, UnsupportedError  # noqa: E402

EVIL = """\
from pathlib import Path
Path({marker!r}).write_text("checkpoint code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _remote_code_tokenizer(d: Path, *, where: str, with_config: bool) -> Path:
    """A real byte-level tokenizer (saved by transformers) whose config asks for ``evil_tok.EvilTokenizer``: a .py
    file of the checkpoint that writes a marker file when imported."""
    d.mkdir(parents=True)
    byte_level_tokenizer().save_pretrained(d)
    marker = d / "MARKER"
    (d / "evil_tok.py").write_text(EVIL.format(marker=str(marker)))
    if with_config:
        import transformers

        transformers.LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2).save_pretrained(d)
    tc_path = d / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "EvilTokenizer"  # unknown to transformers: it would prompt for the remote code
    if where == "tokenizer_config":
        tc["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    elif where == "tokenizer_config_legacy":
        tc["auto_map"] = ["evil_tok.EvilTokenizer", None]
    else:  # config.json's auto_map
        cfg_path = d / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {"model_type": "llama"}
        cfg["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
        cfg_path.write_text(json.dumps(cfg))
    tc_path.write_text(json.dumps(tc))
    return d


def _load_in_subprocess(d: Path, stdin_text: str | None, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = ("from jaxquant.converters.hf import load_tokenizer\n"
            "from jaxquant.errors import CheckpointError\n"
            "try:\n"
            f"    load_tokenizer({str(d)!r})\n"
            "except CheckpointError as e:\n"
            "    print('CheckpointError:', e)\n"
            "    raise SystemExit(3)\n")
    kw = {"input": stdin_text} if stdin_text is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.parametrize("where,with_config", [("tokenizer_config", False), ("tokenizer_config", True),
                                               ("tokenizer_config_legacy", False), ("config", True)])
def test_tokenizer_auto_map_is_refused_and_never_run(tmp_path, where, with_config):
    d = _remote_code_tokenizer(tmp_path / "ck", where=where, with_config=with_config)
    # stdin not a terminal (before: a ValueError traceback from transformers' prompt) and stdin answering "y"
    # (before: the checkpoint's Python ran)
    for stdin_text in (None, "y\n"):
        r = _load_in_subprocess(d, stdin_text, tmp_path)
        assert r.returncode == 3, (r.stdout, r.stderr[-3000:])
        msg = r.stdout
        name = "config.json" if where == "config" else "tokenizer_config.json"
        assert f"{d / name}" in msg and "auto_map" in msg and "evil_tok.EvilTokenizer" in msg
        assert "never runs checkpoint code" in msg and "PreTrainedTokenizerFast" in msg
        assert "[y/N]" not in r.stdout + r.stderr  # no prompt
        assert not (d / "MARKER").exists()
    assert not (tmp_path / "hf_home" / "modules").exists()  # transformers never copied the module


def test_auto_map_error_in_process(tmp_path):
    d = _remote_code_tokenizer(tmp_path / "ck", where="tokenizer_config", with_config=False)
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: \"auto_map\".*delete \"auto_map\""):
        load_tokenizer(d)
    assert not (d / "MARKER").exists()


def test_plain_tokenizer_still_loads_with_trust_remote_code_false(tmp_path):
    d = tmp_path / "ck"
    byte_level_tokenizer().save_pretrained(d)
    tok = load_tokenizer(d)
    assert tok("ab")["input_ids"] == [97, 98]


def test_fixed_auto_map_checkpoint_loads(tmp_path):
    """What the message says to do works: drop auto_map, point tokenizer_class to PreTrainedTokenizerFast."""
    d = _remote_code_tokenizer(tmp_path / "ck", where="tokenizer_config", with_config=True)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    del tc["auto_map"]
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    assert load_tokenizer(d)("hi")["input_ids"] == [104, 105]
    assert not (d / "MARKER").exists()


# ------------------------------------------------------------------------------- quantized checkpoint to load_hf
@pytest.fixture(scope="module", params=["fp8", "nvfp4"])
def modelopt_export_dir(request, tmp_path_factory):
    """A quantized checkpoint written by nvidia-modelopt's own exporter (CPU): FP8 weights (F8_E4M3) or NVFP4
    weights (U8, packed: half the columns, which load_hf used to report as a shape mismatch) + scales."""
    pytest.importorskip("modelopt.torch.export")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    from _export_modelopt_ref import make_llama, modelopt_cfg, modelopt_export, modelopt_quantize

    base = tmp_path_factory.mktemp("q")
    model = make_llama(base / "src", tie=False)
    modelopt_quantize(model, modelopt_cfg(request.param, kv=False))
    modelopt_export(model, base / request.param, "float32")
    return request.param, base / request.param


@pytest.mark.parametrize("strip", ["nothing", "hf_quant_config", "all_json"])
def test_quantized_checkpoint_is_named_not_a_shape_error(modelopt_export_dir, tmp_path, strip):
    import shutil

    fmt, src = modelopt_export_dir
    d = tmp_path / "q"
    shutil.copytree(src, d)
    if strip in ("hf_quant_config", "all_json"):
        (d / "hf_quant_config.json").unlink()
    if strip == "all_json":
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_hf(d, dtype=jnp.float32)
    msg = str(e.value)
    assert "this is a quantized checkpoint" in msg and "shape" not in msg
    assert "jaxquant eval" in msg and "load_quantized" in msg and "quantize the original model" in msg
    if strip == "all_json":
        assert {"fp8": "F8_E4M3", "nvfp4": "U8"}[fmt] in msg
    if strip != "nothing":
        assert "hf_quant_config.json is missing" in msg
    # and what the message advises works: load_quantized reads the checkpoint
    from jaxquant.export import load_quantized

    assert load_quantized(d, dtype=jnp.float32).config.vocab_size > 0


def test_unquantized_checkpoint_still_loads(tmp_path):
    d = write_tiny_family("llama", tmp_path / "src")
    assert load_hf(d, dtype=jnp.float32).config.architecture == "LlamaForCausalLM"


# ------------------------------------------------------------------------------- dtype errors
@pytest.mark.parametrize("bad", ["int8", "fp64", jnp.int32, "not-a-dtype-at-all", object()])
def test_bad_dtype_is_the_package_error(tmp_path, bad):
    with pytest.raises(UnsupportedError) as e:
        resolve_dtype(bad)
    assert isinstance(e.value, JaxquantError) and isinstance(e.value, ValueError)  # old `except ValueError` works
    assert isinstance(e.value, UnsupportedDtypeError)
    assert "bfloat16" in str(e.value)


def test_load_hf_bad_dtype_fails_before_reading(tmp_path):
    d = write_tiny_family("llama", tmp_path / "src")
    with pytest.raises(UnsupportedError, match="bfloat16"):
        load_hf(d, dtype="int8")
    with pytest.raises(UnsupportedError):  # even when the directory is not a checkpoint at all
        load_hf(tmp_path / "nowhere", dtype="int8")
