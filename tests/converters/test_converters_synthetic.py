"""Synthetic checkpoints (converters/synthetic.py): deterministic per tensor whatever the threads, loadable like a
checkpoint (the same materialize path), and a model that calibrates and exports."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.converters.hf import materialize
from jaxquant.converters.synthetic import STD, SyntheticSource, load_synthetic

HF = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=32,
          intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=64, tie_word_embeddings=False)


def _params(loaded):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(loaded.model))}


def test_same_values_whatever_the_threads_and_a_seed_changes_them():
    a = _params(load_synthetic(HF, jnp.float32, seed=3))  # 8 loader threads
    loaded = load_synthetic(HF, jnp.float32)
    src = SyntheticSource(loaded.config, loaded.name_map, seed=3)
    one = materialize(loaded.config, src, dtype=jnp.float32, name_map=loaded.name_map, workers=1)
    b = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(one))}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    c = _params(load_synthetic(HF, jnp.float32, seed=4))
    assert not np.array_equal(a["lm_head.weight"], c["lm_head.weight"])
    w = a["model.layers.0.mlp.down_proj.weight"]
    assert abs(float(w.std()) - STD) < 0.2 * STD and abs(float(a["model.norm.weight"].mean()) - 1) < 0.05


def test_calibrates_and_exports(tmp_path):
    from jaxquant.calibration import quantize
    from jaxquant.export import export_hf, load_quantized

    loaded = load_synthetic(HF, jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, (4, 12)).astype(np.int32)
    quantize(loaded.model, "general/ptq/fp8_default-kv_fp8", (ids, np.ones_like(ids)), batch_size=2, progress=False)
    ref = np.asarray(loaded.model(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))))
    export_hf(loaded, tmp_path / "out")
    back = load_quantized(tmp_path / "out", dtype=jnp.float32)
    got = np.asarray(back.model(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))))
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert jax.tree_util.tree_leaves(ref)


def test_a_tensor_longer_than_the_pool_reads_it_cyclically():
    """Tensors are cut from one pool of POOL normal numbers from offset crc32(name) mod POOL, wrapping around."""
    import zlib

    from jaxquant.converters.synthetic import POOL, _pool

    loaded = load_synthetic(HF, jnp.float32)
    src = SyntheticSource(loaded.config, loaded.name_map, seed=5)
    src.shapes = {"w": (3, (POOL + 7) // 3 + 1), "v": (POOL + 3,)}
    pool = _pool(5)
    for name, add in (("w", 0.0), ("v", 1.0)):
        n = int(np.prod(src.shapes[name]))
        want = np.take(pool, (zlib.crc32(name.encode()) % POOL + np.arange(n)) % POOL) + np.float32(add)
        got = src.get(name)
        assert got.shape == src.shapes[name] and got.dtype == np.float32
        np.testing.assert_array_equal(got.reshape(-1), want)
    assert abs(float(pool.std()) - STD) < 0.01 * STD
