"""Per-expert calibration statistics of the stacked MoE experts.

With the experts' quantizers in ``calibrate`` mode, one forward pass over a left-padded batch must leave each
expert's input amax equal to an independent computation: max |x| over the real (unpadded) tokens transformers
routed to that expert, taken from hooks on transformers' own experts module (its inputs and top-k indices).
The down-projection input sees ``act(x W_gate^T) * (x W_up^T)`` of the same tokens; an expert no token reaches keeps
amax 0 (ModelOpt then fills it from its siblings); weight quantizers hold max |W_e| per expert.
"""

from __future__ import annotations

import numpy as np
import pytest

from _hf_oracle import inputs, make_tiny
from test_gemma4_parity import GEMMA4_26B, make_gemma4

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxquant.converters import load_hf  # noqa: E402
from jaxquant.models.moe import MoeExperts  # noqa: E402
from jaxquant.quantizer import QuantizerConfig  # noqa: E402

FP8 = QuantizerConfig(num_bits=(4, 3))
DEAD = 4  # this expert's router row is pushed far down: no token reaches it


def _experts_modules(model):
    return [(".".join(map(str, p)), m) for p, m in nnx.iter_graph(model) if isinstance(m, MoeExperts)]


def _arm(model):
    for _, ex in _experts_modules(model):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for role in ("input_quantizer", "weight_quantizer"):
                attr = f"{proj}_{role}"
                q = getattr(ex, attr)
                q.configure(FP8, tensor_shape=ex.quantizer_tensor_shape(attr))
                q.set_mode("calibrate")


def _oracle(torch_model, ids, mask, pos, act):
    """Per torch experts module: (inputs [N, H], top-k index [N, k], gate_up [E, 2I, H]) from a forward pre-hook."""
    captured = []
    hooks = []
    for name, mod in torch_model.named_modules():
        if type(mod).__name__.endswith("Experts"):
            def pre(m, args, _name=name):
                captured.append((_name, args[0].detach().double().numpy(), args[1].detach().numpy(),
                                 m.gate_up_proj.detach().double().numpy()))
            hooks.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad():
        torch_model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    for h in hooks:
        h.remove()
    valid = mask.numpy().reshape(-1).astype(bool)
    out = []
    for name, x, idx, gu in captured:
        e_count, two_i, _ = gu.shape
        amax_in, amax_down, count = np.zeros(e_count), np.zeros(e_count), np.zeros(e_count, int)
        for e in range(e_count):
            sel = valid & (idx == e).any(-1)
            count[e] = sel.sum()
            if not sel.any():
                continue
            xs = x[sel]
            amax_in[e] = np.abs(xs).max()
            g, u = xs @ gu[e, : two_i // 2].T, xs @ gu[e, two_i // 2:].T
            amax_down[e] = np.abs(act(g) * u).max()
        out.append((name, amax_in, amax_down, count))
    return out


def _silu(x):
    return x / (1 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _kill_expert(model, routers):
    """Rows 1 and 3 become -row 0 and -row 2, the DEAD row 0: for every token one expert of each pair has a logit
    >= 0, so with top-2 the DEAD expert (logit 0) is never chosen; the other rows stay random."""
    with torch.no_grad():
        for r in routers:
            w = r.weight if hasattr(r, "weight") else r.proj.weight
            w[1] = -w[0]
            w[3] = -w[2]
            w[DEAD] = 0.0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gemma4"])
def test_expert_input_amax_is_routed_max(family, tmp_path):
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(vocab_size=151, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=12, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)
        ref = make_tiny(transformers.Qwen3MoeForCausalLM, cfg, tmp_path)
        routers, act = [layer.mlp.gate for layer in ref.model.layers], _silu
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(vocab_size=151, hidden_size=48, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                                         num_experts_per_tok=2)
        ref = make_tiny(transformers.MixtralForCausalLM, cfg, tmp_path)
        routers, act = [layer.mlp.gate for layer in ref.model.layers], _silu
    else:
        ref = make_gemma4(dict(GEMMA4_26B, num_experts=6, top_k_experts=2), tmp_path)
        routers, act = [layer.router for layer in ref.model.layers], _gelu_tanh
    _kill_expert(ref, routers)
    ref.save_pretrained(tmp_path)

    loaded = load_hf(tmp_path, dtype=jnp.float32)
    _arm(loaded.model)
    ids, mask, pos = inputs(loaded.config.vocab_size, seq=20, left_pad=(0, 6, 13))
    loaded.model(jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32))

    want = _oracle(ref, ids, mask, pos, act)
    got = _experts_modules(loaded.model)
    assert len(got) == len(want) == loaded.config.num_hidden_layers
    for (path, ex), (tname, amax_in, amax_down, count) in zip(got, want):
        assert count[DEAD] == 0 and (count > 0).sum() >= 3, (tname, count)
        for proj in ("gate_proj", "up_proj"):
            a = np.asarray(getattr(ex, f"{proj}_input_quantizer").amax[...]).reshape(-1)
            np.testing.assert_allclose(a, amax_in, rtol=2e-5, err_msg=f"{path}.{proj} vs {tname}")
        a = np.asarray(ex.down_proj_input_quantizer.amax[...]).reshape(-1)
        np.testing.assert_allclose(a, amax_down, rtol=2e-4, err_msg=f"{path}.down_proj vs {tname}")
        assert a[DEAD] == 0.0
        # weight quantizers: amax of each expert's own matrix, whatever the routing
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = np.asarray(getattr(ex, proj)[...])
            a = np.asarray(getattr(ex, f"{proj}_weight_quantizer").amax[...]).reshape(-1)
            np.testing.assert_array_equal(a, np.abs(w).reshape(w.shape[0], -1).max(1))


def test_padding_never_counts(tmp_path):
    """Huge pad-token embeddings change nothing in the experts' statistics."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=151, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                      num_experts=4, num_experts_per_tok=2)
    make_tiny(transformers.Qwen3MoeForCausalLM, cfg, tmp_path)
    ids, mask, _ = inputs(151, seq=16, left_pad=(0, 5, 9))
    ids_np, mask_np = ids.numpy().astype(np.int32), mask.numpy().astype(np.int32)
    stats = []
    for pad_token in (3, 150):
        loaded = load_hf(tmp_path, dtype=jnp.float32)
        emb = loaded.model.model.embed_tokens
        emb.weight[...] = emb.weight[...].at[150].set(1e3)
        _arm(loaded.model)
        x = np.where(mask_np.astype(bool), ids_np, pad_token)
        loaded.model(jnp.asarray(x), jnp.asarray(mask_np))
        ex = loaded.model.model.layers[0].mlp.experts
        stats.append([np.asarray(getattr(ex, f"{p}_input_quantizer").amax[...]) for p in ("gate_proj", "down_proj")])
    for a, b in zip(*stats):
        np.testing.assert_array_equal(a, b)
    assert max(float(a.max()) for a in stats[1]) < 1e3


@pytest.mark.parametrize("impl", ["dense", "grouped"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_fake_quant_uses_each_experts_amax(fmt, impl):
    """After calibration, fake quant of the stacked experts == a per-expert loop over the routed tokens only, each
    expert with its own input / weight amax, for both compute paths (dense compute quantizes per token, so unrouted
    tokens cannot leak; grouped compute only ever sees routed rows)."""
    from jaxquant.models.moe import dense_routing, route_topk
    from jaxquant.numerics import fp8, nvfp4
    from jaxquant.quantizer import BlockSizes

    if fmt == "fp8":
        cfg = QuantizerConfig(num_bits=(4, 3))
        fq = fp8.fake_quant
    else:
        cfg = QuantizerConfig(num_bits=(2, 1), block_sizes=BlockSizes(size=16, type="dynamic", scale_bits=(4, 3)))
        fq = nvfp4.fake_quant_dynamic
    e_n, h, i, n, k = 5, 32, 48, 40, 2
    rng = np.random.default_rng(0)
    ex = MoeExperts(e_n, h, i, rngs=nnx.Rngs(1), init_std=0.3)
    x = jnp.asarray(rng.standard_normal((n, h)).astype(np.float32) * 2)
    logits = jnp.asarray(rng.standard_normal((n, e_n)).astype(np.float32))
    w, idx = route_topk(logits, k, renormalize=True)
    combine, routed = dense_routing(w, idx, e_n)
    tm = jnp.asarray(rng.random(n) > 0.2)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for role in ("input_quantizer", "weight_quantizer"):
            q = getattr(ex, f"{proj}_{role}")
            q.configure(cfg, tensor_shape=ex.quantizer_tensor_shape(f"{proj}_{role}"))
            q.set_mode("calibrate")
    ex.calibrate_weights()
    ex(x, w, idx, token_mask=tm, impl=impl)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for role in ("input_quantizer", "weight_quantizer"):
            getattr(ex, f"{proj}_{role}").set_mode("fake_quant")
    out = np.asarray(ex(x, w, idx, token_mask=tm, impl=impl))
    valid_routed = np.asarray(routed) & np.asarray(tm)[:, None]
    for attr in ("gate_proj_input_quantizer", "down_proj_input_quantizer"):  # per-expert stats over routed rows
        assert (np.asarray(getattr(ex, attr).amax[...]).reshape(-1) > 0).tolist() == valid_routed.any(0).tolist()
    np.testing.assert_allclose(np.asarray(ex.gate_proj_input_quantizer.amax[...]).reshape(-1),
                               [np.abs(np.asarray(x)[valid_routed[:, e]]).max(initial=0.0) for e in range(e_n)])

    def amax(attr, e):
        return getattr(ex, attr).amax[...][e]

    ref = np.zeros((n, h), np.float32)
    for e in range(e_n):
        rows = np.flatnonzero(np.asarray(routed[:, e]))
        if rows.size == 0:
            continue
        xe = x[rows]
        g = fq(xe, amax("gate_proj_input_quantizer", e)) @ fq(ex.gate_proj[...][e], amax("gate_proj_weight_quantizer", e)).T
        u = fq(xe, amax("up_proj_input_quantizer", e)) @ fq(ex.up_proj[...][e], amax("up_proj_weight_quantizer", e)).T
        hh = fq(jax.nn.silu(g) * u, amax("down_proj_input_quantizer", e))
        y = hh @ fq(ex.down_proj[...][e], amax("down_proj_weight_quantizer", e)).T
        ref[rows] += np.asarray(y) * np.asarray(combine[rows, e])[:, None]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # and it really quantized: differs from the unquantized experts
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for role in ("input_quantizer", "weight_quantizer"):
            getattr(ex, f"{proj}_{role}").set_mode("off")
    assert not np.allclose(np.asarray(ex(x, w, idx, impl=impl)), out, atol=1e-3)
