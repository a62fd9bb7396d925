"""The exact copy-upcycled MoE built from the real SmolLM2-135M (spec offline_assets.md §2.4).

Every layer's MLP becomes a Mixtral sparse block of E = 4 identical experts (each = the real MLP) with a random
seeded router (``randn(E, H) * 0.5``, seed = layer index) and top-2 routing. Mixtral renormalises the top-k
weights, so the full-precision output equals the dense model's while the routing is real and uneven: a known
reference for per-expert calibration. The checkpoint is served in the hub's per-expert layout
(``block_sparse_moe.experts.{e}.w1/w3/w2.weight``) through the loader's MoE view, so nothing is written to disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from assets import smollm2_hf_dir  # noqa: E402

from jaxquant.converters.hf import SafetensorsSource, load_hf, materialize, read_hf_config  # noqa: E402
from jaxquant.converters.names import NameMap  # noqa: E402
from jaxquant.io.safetensors import CheckpointFiles  # noqa: E402
from jaxquant.models import ModelConfig  # noqa: E402
from jaxquant.models.moe import moe_tensor_source  # noqa: E402
from jaxquant.quantizer import QuantizerConfig  # noqa: E402

E, TOP_K = 4, 2
FP8 = QuantizerConfig(num_bits=(4, 3))
TEXT = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "In 1905 Albert Einstein published four papers that changed physics.",
    "Mixture-of-experts layers route every token to a few of many feed-forward networks.",
]


class UpcycledSource:
    """The dense checkpoint seen as a copy-upcycled Mixtral, in the hub's per-expert names."""

    def __init__(self, dense: SafetensorsSource, hidden: int):
        self.dense = dense
        self.hidden = hidden

    def _map(self, name):
        parts = name.split(".")
        if "block_sparse_moe" not in parts:
            return ("dense", name)
        layer = int(parts[2])
        if parts[4:] == ["gate", "weight"]:
            return ("router", layer)
        if len(parts) == 8 and parts[5].isdigit() and int(parts[5]) < E and parts[7] == "weight":
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(parts[6])
            if proj:
                return ("dense", f"model.layers.{layer}.mlp.{proj}.weight")
        return ("none", name)

    def has(self, name):
        kind, x = self._map(name)
        return kind == "router" or (kind == "dense" and self.dense.has(x))

    def shape(self, name):
        kind, x = self._map(name)
        return (E, self.hidden) if kind == "router" else self.dense.shape(x)

    def dtype(self, name):
        kind, x = self._map(name)
        return "F32" if kind == "router" else self.dense.dtype(x)

    def get(self, name):
        kind, x = self._map(name)
        if kind == "router":
            return (np.random.default_rng(x).standard_normal((E, self.hidden)) * 0.5).astype(np.float32)
        return self.dense.get(x)

    def where(self, name):
        return f"upcycled:{name}"


def _batch(tokenizer):
    rows = [tokenizer(t)["input_ids"] for t in TEXT]
    s = max(len(r) for r in rows)
    ids = np.zeros((len(rows), s), np.int32)
    mask = np.zeros((len(rows), s), np.int32)
    for i, r in enumerate(rows):  # left padding, as hf_ptq
        ids[i, s - len(r):] = r
        mask[i, s - len(r):] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def test_copy_upcycled_smollm2_equals_dense():
    d = smollm2_hf_dir()
    dense = load_hf(d, dtype=jnp.float32)
    hf = read_hf_config(d)
    mix = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                              "rope_parameters", "max_position_embeddings", "tie_word_embeddings")}
    mix.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=E,
               num_experts_per_tok=TOP_K, sliding_window=None)
    config = ModelConfig.from_hf_config(mix)
    nm = NameMap.for_config(config)
    source = UpcycledSource(SafetensorsSource(CheckpointFiles.open(d), nm), hf["hidden_size"])
    moe = materialize(config, moe_tensor_source(config, source), dtype=jnp.float32, name_map=nm)

    ids, mask = _batch(dense.tokenizer())
    valid = np.asarray(mask).astype(bool)

    # calibrate the dense MLP inputs and the experts' inputs in the same pass as the logits
    dense_q = [layer.mlp.gate_proj.input_quantizer for layer in dense.model.model.layers]
    experts = [layer.block_sparse_moe.experts for layer in moe.model.layers]
    for q in dense_q:
        q.configure(FP8)
        q.set_mode("calibrate")
    for ex in experts:
        ex.gate_proj_input_quantizer.configure(FP8, tensor_shape=ex.quantizer_tensor_shape("gate_proj_input_quantizer"))
        ex.gate_proj_input_quantizer.set_mode("calibrate")
    run = nnx.jit(lambda m, i, a: m(i, a))
    ref = np.asarray(run(dense.model, ids, mask))
    out = np.asarray(run(moe, ids, mask))

    diff, top = float(np.abs(out - ref)[valid].max()), float(np.abs(ref[valid]).max())
    print(f"upcycled SmolLM2 (E={E}, top-{TOP_K}): max |diff| {diff:.3g}, max |logit| {top:.3g}")
    assert diff <= 1e-4 * top
    assert (out[valid].argmax(-1) == ref[valid].argmax(-1)).mean() > 0.99

    uneven = all_hit = 0
    for q, ex in zip(dense_q, experts):
        per_expert = np.asarray(ex.gate_proj_input_quantizer.amax[...]).reshape(-1)
        assert (per_expert > 0).sum() >= TOP_K  # an expert no token reaches keeps amax 0 (ModelOpt fills it later)
        all_hit += int((per_expert > 0).all())
        # each token went to two experts: the max over experts is the dense MLP's input amax (ModelOpt's sync)
        np.testing.assert_allclose(per_expert.max(), float(q.amax[...]), rtol=1e-5)
        uneven += int(np.ptp(per_expert) > 1e-3 * per_expert.max())
    print(f"layers where every expert got tokens: {all_hit}/{len(experts)}; uneven amax: {uneven}")
    assert uneven >= len(experts) // 2 and all_hit >= len(experts) // 2  # real, uneven routing
