"""Calibrated amax vs an independent reference: transformers (PyTorch) with forward hooks on the same batches.

The reference collects, per linear, ``max |input|`` over the real (unmasked) tokens with forward pre-hooks, and the
post-RoPE key / value ``max |.|`` through a registered attention function that wraps transformers' eager attention
(the tensors ModelOpt's ``k_bmm_quantizer`` / ``v_bmm_quantizer`` see). Position ids are passed as
``cumsum(mask) - 1`` (jaxquant's convention for left padding; see docs/ptq.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from jaxquant.calibration import quantize  # noqa: E402
from jaxquant.converters import load_hf  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def torch_reference(model, batches):
    """``{ModelOpt quantizer name: amax}`` from hooks on the torch model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    amax: dict[str, float] = {}
    cur = {}

    def upd(name, x, mask_bs):
        a = x.detach().abs().float()
        a = torch.where(mask_bs, a, torch.zeros_like(a))
        amax[name] = max(amax.get(name, 0.0), float(a.max()))

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS:
            def pre(m, args, name=name):
                upd(f"{name}.input_quantizer", args[0], cur["mask"][..., None])
            handles.append(mod.register_forward_pre_hook(pre))

    def capture(module, query, key, value, attention_mask, **kw):
        prefix = f"model.layers.{module.layer_idx}.self_attn"
        m = cur["mask"][:, None, :, None]  # key/value [B, Hkv, S, D]
        upd(f"{prefix}.k_bmm_quantizer", key, m)
        upd(f"{prefix}.v_bmm_quantizer", value, m)
        return eager_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("jaxquant_capture", capture)
    AttentionMaskInterface.register("jaxquant_capture", eager_mask)  # the additive mask eager attention expects
    model.set_attn_implementation("jaxquant_capture")
    try:
        with torch.no_grad():
            for ids, mask in batches:
                ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
                cur["mask"] = mask_t.bool()
                pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
                model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation("eager")
    return amax


def _compare(state, ref, weights, *, rtol):
    worst = 0.0
    for name, v in ref.items():
        ours = float(state[name + "._amax"])
        rel = abs(ours - v) / v
        worst = max(worst, rel)
        assert rel <= rtol, f"{name}: jaxquant {ours} vs torch {v} (rel {rel:.2e})"
    for name, w in weights.items():
        assert float(state[name + "._amax"]) == float(np.abs(w).max()), name
    return worst


def _weights(model):
    return {f"{n}.weight_quantizer": p.detach().numpy() for n, p in model.named_parameters()
            if n.endswith(".weight") and n.rsplit(".", 2)[-2] in LINEARS
            for n in [n[: -len(".weight")]]}


def test_tiny_llama_amax_equals_torch_hooks(tmp_path):
    from _hf_oracle import make_tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    tmodel = make_tiny(LlamaForCausalLM, cfg, tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (6, 20)).astype(np.int32)
    mask = np.ones_like(ids)
    for i, k in enumerate([0, 3, 9, 0, 15, 1]):
        mask[i, :k] = 0
        ids[i, :k] = 0
    batches = [(ids[i:i + 3], mask[i:i + 3]) for i in (0, 3)]
    ref = torch_reference(tmodel, batches)
    loaded = load_hf(tmp_path, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 for float32 matmuls
        r = quantize(loaded.model, "general/ptq/fp8_default-kv_fp8", batches, progress=False)
    assert len(ref) == 2 * (7 + 2)
    _compare(r.calibration_state, ref, _weights(tmodel), rtol=1e-5)


@pytest.mark.slow
def test_smollm2_amax_equals_torch_hooks():
    """The real SmolLM2-135M on real text (lee_news), 30 layers: every input and k/v amax."""
    from assets import smollm2_hf_dir

    from jaxquant.data import builtin_texts, calib_batches

    d = smollm2_hf_dir()
    try:
        texts = builtin_texts("lee_news")
    except Exception as e:  # gensim test data not installed
        pytest.skip(f"built-in text unavailable: {e}")
    loaded = load_hf(d, dtype=jnp.float32)
    tok = loaded.tokenizer()
    cb = calib_batches(texts, tok, calib_size=6, calib_seq=96, batch_size=3)
    batches = list(cb)
    assert cb.attention_mask.min() == 0  # left padding is exercised
    tmodel = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ref = torch_reference(tmodel, batches)
    with jax.default_matmul_precision("highest"):
        r = quantize(loaded.model, "general/ptq/fp8_default-kv_fp8", batches, progress=False)
    assert len(ref) == 30 * 9
    worst = _compare(r.calibration_state, ref, _weights(tmodel), rtol=2e-5)
    print(f"SmolLM2: {len(ref)} activation amax, worst relative difference {worst:.2e}")
