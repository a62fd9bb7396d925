"""KV cache with Hadamard-rotated NVFP4 keys (hf_ptq ``--kv_cache_qformat nvfp4_rotate``).

ModelOpt rotates a quantizer's input (after ``pre_quant_scale``) with ``normalized_hadamard_transform``, whose kernel
is the CUDA-only ``fast_hadamard_transform`` package: on CPU these tests stand in its documented reference,
``x @ scipy.linalg.hadamard(n).T * scale`` in float32 (``_fht_stand_in``), so ModelOpt's calibration and export run.
What is checked: jaxquant's rotation against the exact transform (float64), the preset resolving like hf_ptq's with the
query quantizer disabled but rotating, the attention scores unchanged by rotating Q and K, ModelOpt's export of the
same amax byte-identical to jaxquant's (a plain NVFP4 KV checkpoint: the rotation is not recorded), and jaxquant's own
calibration giving ModelOpt's key amax (of the rotated keys) to float32 rounding.
"""

import sys
import types

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402
from test_export_kv_affine import hf_ptq_cfg  # noqa: E402


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.fixture
def _fht_stand_in(monkeypatch):
    """A CPU ``fast_hadamard_transform`` module: its package's reference ``hadamard_transform_ref`` (a float32 matmul
    with the Sylvester Hadamard matrix, times ``scale``, in the input dtype)."""
    import torch

    def hadamard_transform(x, scale=1.0):
        h = torch.tensor(_sylvester(x.shape[-1]), dtype=torch.float32)
        return (torch.nn.functional.linear(x.float(), h) * scale).to(x.dtype)

    monkeypatch.setitem(sys.modules, "fast_hadamard_transform",
                        types.SimpleNamespace(hadamard_transform=hadamard_transform))


@pytest.mark.parametrize("shape,block", [((3, 5, 64), None), ((7, 96), None), ((4, 256), 16)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rotation_equals_the_exact_normalized_hadamard(shape, block, dtype):
    import jax.numpy as jnp

    from jaxquant.numerics.hadamard import block_size_for, rotate

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    xj = jnp.asarray(x).astype(dtype)
    bs = block_size_for(shape[-1], block)
    assert bs == (block or (64 if shape[-1] == 64 else 32))
    xb = np.asarray(xj.astype(jnp.float32), np.float64).reshape(*shape[:-1], shape[-1] // bs, bs)
    want = (xb @ _sylvester(bs).T / np.sqrt(bs)).reshape(shape)
    got = np.asarray(rotate(xj, block).astype(jnp.float32), np.float64)
    tol = 4e-7 if dtype == "float32" else 8e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    back = np.asarray(rotate(rotate(jnp.asarray(x), block), block))  # orthonormal and symmetric: an involution
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-6 * np.abs(x).max())


def test_preset_resolves_with_a_rotating_disabled_query_quantizer(tmp_path):
    import jax.numpy as jnp

    from jaxquant.converters import load_hf
    from jaxquant.recipe import apply_recipe, preset_recipe

    R.make_llama(tmp_path / "src", tie=False)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    apply_recipe(loaded.model, preset_recipe("fp8", "nvfp4_rotate"), warn=False)
    attn = loaded.model.model.layers[0].self_attn
    assert not attn.q_bmm_quantizer.enabled and attn.q_bmm_quantizer.rotation == (None, False)
    assert attn.k_bmm_quantizer.format == "nvfp4" and attn.k_bmm_quantizer.rotation == (None, False)
    assert attn.v_bmm_quantizer.format == "nvfp4" and attn.v_bmm_quantizer.rotation is None
    q = np.random.default_rng(1).standard_normal((2, 6, 4, 16)).astype(np.float32)
    k = np.random.default_rng(2).standard_normal((2, 6, 4, 16)).astype(np.float32)
    qr, kr = (np.asarray(attn.q_bmm_quantizer(jnp.asarray(a))) for a in (q, k))
    np.testing.assert_allclose(np.einsum("bshd,bthd->bhst", qr, kr), np.einsum("bshd,bthd->bhst", q, k), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rotate_kv_byte_identical_to_modelopt(tmp_path, dtype, _fht_stand_in):
    ref = R.compare_exports(tmp_path, hf_ptq_cfg("nvfp4_rotate"), dtype, n_enabled=32)  # 28 linear + 4 KV
    assert ref["model.layers.1.self_attn.k_proj.k_scale"][:2] == ("F32", ())
    q = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert q["kv_cache_quant_algo"] == "NVFP4"


def test_rotate_kv_calibration_equals_modelopt(tmp_path, _fht_stand_in):
    """jaxquant's preset calibrated on ModelOpt's two batches: the key amax is that of the rotated keys (it differs
    from the unrotated keys' amax), equal to ModelOpt's to float32 rounding (torch and XLA sum differently)."""
    import jax.numpy as jnp
    import torch

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.recipe import preset_recipe

    model = R.make_llama(tmp_path / "src", tie=False)
    amax = R.modelopt_quantize(model, hf_ptq_cfg("nvfp4_rotate"))
    plain = R.modelopt_quantize(R.make_llama(tmp_path / "src2", tie=False), hf_ptq_cfg("nvfp4"))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 12), generator=g).numpy() for _ in range(2)]
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    quantize(loaded.model, preset_recipe("fp8", "nvfp4_rotate"), [(b, None) for b in batches], progress=False)
    for i in range(2):
        name = f"model.layers.{i}.self_attn.k_bmm_quantizer"
        ours = float(np.asarray(loaded.model.model.layers[i].self_attn.k_bmm_quantizer.amax.value))
        assert ours == pytest.approx(float(amax[name]), rel=1e-5), name
        assert float(amax[name]) != pytest.approx(float(plain[name]), rel=1e-3), name
