"""bf16 activations round where transformers' do: computed in float32, rounded once (issue 11, bf16 scales).

torch's GELU / SiLU kernels upcast a bf16 tensor to float32 internally and round the result once. jax.nn applied
to a bf16 array rounds after every elementwise op and, for tanh-GELU, multiplies by its constants rounded to bf16
(sqrt(2/pi) -> 0.796875): before the fix about a fifth of all bf16 inputs in [-3, 3] gave a different bf16 output
than torch, and Gemma 4's bf16 ``mlp.down_proj`` input amax drifted from float32 further than torch's
(benchmarks/results/README.md "bf16 activations").

Oracle: torch's own bf16 activation on every bf16 value with 2^-20 <= |x| <= 3 (the range where float32
evaluation is exact enough that both libraries must agree to the bit; below it XLA's CPU flushes subnormals,
beyond -3 the GELU tail is a float32 cancellation whose last bit depends on the erf / tanh implementation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.models.layers import ACTIVATIONS

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_fast": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def _bf16_grid(lo: float, hi: float) -> np.ndarray:
    """Every bf16 value with ``lo <= |x| <= hi``, as float32."""
    v = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    return v[np.isfinite(v) & (np.abs(v) >= lo) & (np.abs(v) <= hi)]


def test_every_activation_has_a_torch_oracle():
    assert set(ACTIVATIONS) == set(TORCH)


@pytest.mark.parametrize("name", sorted(TORCH))
def test_bf16_activation_equals_torch_bitwise(name):
    x = _bf16_grid(2.0**-20, 3.0)
    ours = np.asarray(ACTIVATIONS[name](jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
    ref = TORCH[name](torch.from_numpy(x).bfloat16()).float().numpy()
    bad = ours != ref
    assert not bad.any(), f"{name}: {bad.sum()} of {x.size} bf16 inputs differ from torch, e.g. x={x[bad][:4]}"


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_float32_activation_unchanged(name):
    """Float32 inputs take jax.nn's float32 path unchanged (the float32 logits parity depends on it)."""
    plain = {"silu": jax.nn.silu, "gelu": lambda z: jax.nn.gelu(z, approximate=False),
             "gelu_pytorch_tanh": lambda z: jax.nn.gelu(z, approximate=True)}[name]
    x = jnp.asarray(np.random.default_rng(0).normal(0, 3, 4096), jnp.float32)
    assert ACTIVATIONS[name](x).dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ACTIVATIONS[name](x)), np.asarray(plain(x)))


def test_bf16_calibration_amax_is_a_bf16_value(tmp_path):
    """The amax of a bf16 tensor is one of its values, so a bf16 number. Before ``reduce_amax`` pinned the
    rounding, XLA fused ``act(gate) * up`` (and RoPE) into the max without the bf16 round trip, and the
    ``down_proj`` / ``k_bmm`` amax were float32 values the bf16 model never produced."""
    import jax.numpy as jnp
    from test_gemma4_parity import GEMMA4_31B, make_gemma4

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf

    cfg = dict(GEMMA4_31B, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    make_gemma4(cfg, tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg["vocab_size"], (4, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    r = quantize(load_hf(tmp_path, dtype=jnp.bfloat16).model, "general/ptq/fp8_default-kv_fp8", [(ids, mask)],
                 progress=False)
    amax = {k: np.float32(v) for k, v in r.calibration_state.items()
            if k.endswith("._amax") and ("input_quantizer" in k or "bmm_quantizer" in k)}
    assert any(".down_proj." in k for k in amax) and any("k_bmm" in k for k in amax)
    bad = {k: float(v) for k, v in amax.items() if v.view(np.uint32) & 0xFFFF}
    assert not bad, f"activation amax that are not bfloat16 values: {bad}"
