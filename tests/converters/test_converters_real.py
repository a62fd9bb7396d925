"""Real checkpoints: SmolLM2-135M (Llama) and Gemma-3-270M (Gemma 3), against transformers on real text.

* our GGUF loader == our HF-directory loader of the directory transformers writes from the same GGUF
  (identical config, bitwise-identical parameters);
* logits parity on real Wikipedia text, fp32: max |diff| <= 1e-4 * max |logit| (left-padded batch);
* perplexity equal to transformers' within 0.1%.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from assets import smollm2_gguf_path, smollm2_hf_dir  # noqa: E402
from assets import gemma3_gguf_path, gemma3_hf_dir  # noqa: E402

from jaxquant.converters import load_hf, load_tokenizer  # noqa: E402
from jaxquant.converters.gguf import load_gguf  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ = 192


def _real_batch(tokenizer):
    """Two rows of real Wikipedia text; row 1 is shorter and left-padded."""
    from jaxquant.data.builtin import builtin_texts

    text = " ".join(builtin_texts("wikipedia", "test")[:3])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2 * SEQ
    a = ids[:SEQ]
    b = ids[SEQ:2 * SEQ - 40]
    mask = np.ones((2, SEQ), np.int64)
    mask[1, :40] = 0
    batch = np.array([a, [0] * 40 + b], np.int64)
    return batch, mask


def _torch_logits(d, batch, mask):
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor(batch)
    am = torch.tensor(mask)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=am, position_ids=pos).logits.float().numpy()


def _ppl_from_logits(logits, batch, mask):
    lg = logits[:, :-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    tl = np.take_along_axis(lg, batch[:, 1:, None], -1)[..., 0]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    return float(np.exp((lse - tl)[valid].mean()))


def _check_parity_and_ppl(d):
    loaded = load_hf(d, dtype=jnp.float32)
    tok = loaded.tokenizer()
    batch, mask = _real_batch(tok)
    ref = _torch_logits(str(d), batch, mask)
    ids, am = jnp.asarray(batch, jnp.int32), jnp.asarray(mask, jnp.int32)
    ours = np.asarray(nnx.jit(lambda mod, i, a: mod(i, a))(loaded.model, ids, am))
    m = mask.astype(bool)
    diff, top = float(np.abs(ours - ref)[m].max()), float(np.abs(ref[m]).max())
    assert diff <= 1e-4 * top, (diff, top)
    total, n = nnx.jit(lambda mod, i, a: mod.nll(i, a))(loaded.model, ids, am)
    ppl_ours = float(np.exp(float(total) / int(n)))
    ppl_ref = _ppl_from_logits(ref, batch, mask)
    assert abs(ppl_ours / ppl_ref - 1) < 1e-3, (ppl_ours, ppl_ref)
    assert ppl_ref < 100  # real text, real model
    return diff, top, ppl_ours, ppl_ref


def _check_gguf_equals_hf(gguf_path, hf_dir):
    a = load_hf(hf_dir, dtype=jnp.float32)
    b = load_gguf(gguf_path, dtype=jnp.float32)
    assert a.config == b.config
    pa = dict(nnx.to_flat_state(nnx.state(a.model, nnx.Param)))
    pb = dict(nnx.to_flat_state(nnx.state(b.model, nnx.Param)))
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k].get_value()), np.asarray(pb[k].get_value()), err_msg=str(k))
    # the bf16 default goes through the same cast on both paths
    ta = load_tokenizer(hf_dir)
    tb = load_tokenizer(gguf_path)
    text = "The quick brown fox jumps over the lazy dog. Grüße, 東京!"
    assert ta(text)["input_ids"] == tb(text)["input_ids"]


def test_smollm2_gguf_equals_hf_dir():
    _check_gguf_equals_hf(smollm2_gguf_path(), smollm2_hf_dir())


def test_smollm2_parity_and_perplexity():
    _check_parity_and_ppl(smollm2_hf_dir())


def test_smollm2_generate():
    from jaxquant.models.generate import generate

    loaded = load_hf(smollm2_hf_dir(), dtype=jnp.float32)
    out = generate(loaded.model, loaded.tokenizer(), "The capital of France is", max_new_tokens=4)
    assert "Paris" in out


@pytest.mark.slow
def test_gemma3_gguf_equals_hf_dir():
    _check_gguf_equals_hf(gemma3_gguf_path(), gemma3_hf_dir())


@pytest.mark.slow
def test_gemma3_parity_and_perplexity():
    _check_parity_and_ppl(gemma3_hf_dir())


_NO_TORCH = """
import sys, json
sys.modules["torch"] = None  # as if torch were not installed
from jaxquant.converters import load_tokenizer
tok = load_tokenizer(sys.argv[1])
print(json.dumps(tok(sys.argv[2])["input_ids"]))
"""

_HF_DIR_NO_TORCH = """
import sys, json
from jaxquant.transformers_import import hide_torch
assert hide_torch()  # what the jaxquant command does first
from jaxquant.converters import load_tokenizer
tok = load_tokenizer(sys.argv[1])
assert sys.modules["torch"] is None, "something imported torch"
enc = tok(sys.argv[2])
print(json.dumps([type(tok).__name__, enc["input_ids"], enc.get("attention_mask"), tok.bos_token_id,
                  tok.eos_token_id, tok.pad_token_id, len(tok)]))
"""

_LOAD_RSS = """
import sys, json, resource
import jax, jax.numpy as jnp
from flax import nnx
from jaxquant.converters import load_hf
import jaxquant.models.decoder  # noqa
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = load_hf(sys.argv[1], dtype=jnp.bfloat16)
jax.block_until_ready(nnx.state(m.model))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(m.model, nnx.Param)))
print(json.dumps([(peak - base) * 1024, n]))
"""


def _run(code, *args, stderr: list | None = None):
    import json
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if stderr is not None:
        stderr.append(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_gguf_tokenizer_without_torch():
    text = "The quick brown fox jumps over the lazy dog. Grüße, 東京!"
    ids = _run(_NO_TORCH, smollm2_gguf_path(), text)
    assert ids == load_tokenizer(smollm2_gguf_path())(text)["input_ids"]


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_hf_dir_tokenizer_same_without_torch(which):
    """The jaxquant command hides torch (``hide_torch``); transformers must then pick the same tokenizer class
    and produce the same ids and special tokens as ``AutoTokenizer`` with torch importable (in this process)."""
    d = smollm2_hf_dir() if which == "smollm2" else gemma3_hf_dir()
    text = "The quick brown fox jumps over the lazy dog.\n  Grüße, 東京! <|endoftext|> 12345 tabs\tand  spaces"
    err: list = []
    got = _run(_HF_DIR_NO_TORCH, d, text, stderr=err)
    assert "PyTorch was not found" not in err[0]  # transformers' advice is true of the process, not of the machine
    tok = load_tokenizer(d)
    enc = tok(text)
    assert "torch" in sys.modules and sys.modules["torch"] is not None
    assert got == [type(tok).__name__, enc["input_ids"], enc.get("attention_mask"), tok.bos_token_id,
                   tok.eos_token_id, tok.pad_token_id, len(tok)]


def test_load_peak_host_memory():
    """bf16 load of the fp32 checkpoint: peak RSS grows by < 2x the bf16 params (no second full copy;
    the memory-mapped fp32 file is released tensor by tensor)."""
    grown, params = _run(_LOAD_RSS, smollm2_hf_dir())
    assert grown < 2 * params, (grown / 2**20, params / 2**20)
