"""``mse`` calibration against nvidia-modelopt's own ``mse_calibrate`` on CPU, a numpy brute force for stacked MoE
experts, its options, and an export through ``quantize`` / ``jaxquant ptq``.

ModelOpt's static NVFP4 fake quant is a Triton kernel (no CPU path); the ModelOpt runs here replace it by the numpy
emulation of that kernel in ``tests/numerics/_numerics_ref.py`` (``triton_static_np``: ModelOpt's own CPU
``scaled_e4m3_impl`` for the block scale, the kernel's E2M1 rounding in numpy), which jaxquant's static fake quant
is tested bit-exact against. Everything else (``MseCalibrator`` / ``NVFP4MSECalibrator``, the candidates, the
weight layout, the shared global amax of q/k/v and gate/up) is ModelOpt's code.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.calibration import quantize
from jaxquant.calibration.algorithms import resolve_algorithm
from jaxquant.calibration.mse import MseSettings, fp8_scale_candidates, multipliers
from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.models import ModelConfig, build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "numerics"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

F32 = np.float32
NVFP4_STATIC = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}}
WEIGHT_FORMATS = {
    "fp8": {"num_bits": (4, 3), "axis": None},
    "fp8_per_channel": {"num_bits": (4, 3), "axis": 0},
    "int8_per_channel": {"num_bits": 8, "axis": 0},
    "int4_block32": {"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}},
    "nvfp4_static": NVFP4_STATIC,
}


def _weights_only(wcfg, **algo):
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": wcfg},
                          {"quantizer_name": "*lm_head*", "enable": False},
                          {"quantizer_name": "*embed*", "enable": False}],
            "algorithm": {"method": "mse", **algo}}


# ----------------------------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("start,stop,step", [(0.25, 4.0, 0.1), (1.0, 1.5, 0.5), (0.5, 2.0, 0.05), (0.1, 10.0, 0.3)])
def test_multipliers_are_torch_linspace(start, stop, step):
    torch = pytest.importorskip("torch")
    from modelopt.torch.quantization.calib.mse import MseCalibrator

    s = MseSettings(step_size=step, start_multiplier=start, stop_multiplier=stop)
    cal = MseCalibrator(amax=torch.tensor(1.0), step_size=step, start_multiplier=start, stop_multiplier=stop)
    ref = cal._generate_candidates("cpu").numpy()
    ours = multipliers(s)
    assert s.num_steps == cal._num_steps == len(ours)
    # CPU torch vectorizes linspace; values may differ from CUDA's formula (ours) in the last bit only
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1, ulps


def test_fp8_scale_candidates_are_modelopts():
    pytest.importorskip("torch")
    from modelopt.torch.kernels.quantization.gemm._fp8_scale_candidates import fp8_scale_candidates as mo

    ours = fp8_scale_candidates()
    assert len(ours) == 126 and ours[-1] == 1.0
    np.testing.assert_array_equal(ours, mo().numpy())


# ----------------------------------------------------------------------------------------------- vs ModelOpt
@pytest.fixture(scope="module")
def heavy_llama(tmp_path_factory):
    """A tiny HF Llama with heavy-tailed projection weights (where the search moves the amax), saved to disk."""
    from _tiny_llama import write_llama

    return write_llama(tmp_path_factory, "mse_llama", layers=2, max_pos=128)


def _static_kernel_on_cpu(monkeypatch):
    """ModelOpt's static NVFP4 fake quant (Triton) replaced by its numpy emulation (module doc)."""
    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tqm
    import torch
    from _numerics_ref import triton_static_np

    def static_fp4(x, amax, global_amax, quantize_block_scales=True, fp8_max=448.0, out_dtype=None, *_):
        assert quantize_block_scales
        bs = x.numel() // amax.numel()
        y = triton_static_np(x.detach().float().numpy().reshape(-1, bs), amax.detach().float().numpy().reshape(-1, 1),
                             global_amax.detach().float().numpy(), bs, fp8_max=fp8_max)
        return torch.from_numpy(y.reshape(x.shape)).to(out_dtype or x.dtype)

    monkeypatch.setattr(tqm, "static_blockwise_fp4_fake_quant", static_fp4)


def _modelopt_mse(model, cfg):
    import modelopt.torch.quantization as mtq

    m = copy.deepcopy(model)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(m, copy.deepcopy(cfg), forward_loop=None)
    return m


@pytest.mark.parametrize("fmt,sweep,chunk_bytes", [(f, False, None) for f in WEIGHT_FORMATS]
                         + [("nvfp4_static", True, None), ("nvfp4_static", False, 4 * 12 * 64 * 64)])
def test_weight_amax_equals_modelopt_mse(heavy_llama, monkeypatch, fmt, sweep, chunk_bytes):
    """Bit-equal amax; ``chunk_bytes`` forces chunks of a few candidates (the scan keeps the first least error across
    chunks: saturated static-NVFP4 candidates tie exactly)."""
    from jaxquant.calibration import mse
    from jaxquant.converters import load_hf

    _static_kernel_on_cpu(monkeypatch)
    if chunk_bytes is not None:
        monkeypatch.setattr(mse, "CHUNK_BYTES", chunk_bytes)
    tmodel, d = heavy_llama
    cfg = _weights_only(WEIGHT_FORMATS[fmt], fp8_scale_sweep=sweep)
    ref_model = _modelopt_mse(tmodel, cfg)
    loaded = load_hf(d, dtype=jnp.float32)
    state = quantize(loaded.model, copy.deepcopy(cfg), None, progress=False).calibration_state
    n = moved = 0
    for name, mod in ref_model.named_modules():
        q = getattr(mod, "weight_quantizer", None)
        if q is None or not q.is_enabled:
            continue
        ours = state[f"{name}.weight_quantizer._amax"]
        ref = q._amax.detach().float().numpy().reshape(ours.shape)
        np.testing.assert_array_equal(ours, ref, err_msg=name)
        if f"{name}.weight_quantizer._global_amax" in state:  # q/k/v and gate/up share one (the max)
            assert float(q.global_amax) == float(state[f"{name}.weight_quantizer._global_amax"]), name
        w = np.abs(mod.weight.detach().float().numpy())
        n += ours.size
        moved += int(np.sum(ours != _max_amax(fmt, w, ours.shape)))
    assert n == {"fp8": 14}.get(fmt, n) and moved > n // 4  # the search moved a good part of the amax
    if fmt == "nvfp4_static":
        g = [state[f"model.layers.0.self_attn.{p}_proj.weight_quantizer._global_amax"] for p in "qkv"]
        assert g[0] == g[1] == g[2]


def _max_amax(fmt, a, shape):
    if fmt == "fp8":
        return a.max()
    if fmt in ("fp8_per_channel", "int8_per_channel"):
        return a.max(axis=1, keepdims=True)
    bs = a.shape[1] // (shape[1] if fmt == "nvfp4_static" else shape[-2])
    return a.reshape(a.shape[0], -1, bs).max(-1).reshape(shape)


def test_sweep_leaves_other_weights_at_their_max_amax(heavy_llama):
    """``fp8_scale_sweep: true`` searches static NVFP4 weights only (ModelOpt skips the rest)."""
    from jaxquant.converters import load_hf

    _, d = heavy_llama
    cfg = _weights_only(WEIGHT_FORMATS["fp8"], fp8_scale_sweep=True)
    cfg["quant_cfg"].insert(2, {"quantizer_name": "*mlp*weight_quantizer", "cfg": NVFP4_STATIC})
    loaded = load_hf(d, dtype=jnp.float32)
    state = quantize(loaded.model, cfg, None, progress=False).calibration_state
    w = np.asarray(loaded.model.model.layers[0].self_attn.o_proj.weight[...])
    assert state["model.layers.0.self_attn.o_proj.weight_quantizer._amax"] == np.abs(w).max()
    w = np.asarray(loaded.model.model.layers[0].mlp.down_proj.weight[...])
    assert np.any(state["model.layers.0.mlp.down_proj.weight_quantizer._amax"]
                  != np.abs(w).reshape(w.shape[0], -1, 16).max(-1))


# ----------------------------------------------------------------------------------------------- MoE experts
QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 101,
             "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 4,
             "num_experts_per_tok": 2, "norm_topk_prob": True, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False}


def _sweep_brute_force(w, global_amax):
    """Per 16-block: the first of the 126 candidates of least squared error (numpy, ModelOpt's kernel emulated)."""
    from _numerics_ref import triton_static_np

    blocks = w.reshape(-1, 16).astype(F32)
    cands = fp8_scale_candidates()
    errs = np.stack([((blocks - triton_static_np(blocks, np.full((len(blocks), 1), F32(global_amax) * c, F32),
                                                 global_amax)) ** 2).sum(-1) for c in cands])
    best = cands[np.argmin(errs, axis=0)]
    return (np.ones(len(blocks), F32) * (F32(global_amax) * best)).reshape(w.shape[0], -1)


def test_stacked_experts_are_searched_one_by_one():
    """Each expert of a stacked ``[E, out, in]`` weight gets its own sweep against its own (gate/up shared) global
    amax; ModelOpt once ran 0 iterations on fused experts (PR #1382)."""
    pytest.importorskip("torch")
    m = build_model(ModelConfig.from_hf_config(QWEN3_MOE), dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 101, (4, 12)).astype(np.int32)
    r = quantize(m, "general/ptq/nvfp4_experts_only_mse-kv_fp8_cast", [(ids, np.ones_like(ids))], progress=False)
    st = r.calibration_state
    experts = m.model.layers[0].mlp.experts
    gate, up = (np.asarray(getattr(experts, p)[...]) for p in ("gate_proj", "up_proj"))
    assert gate.ndim == 3 and gate.shape[0] == 4
    for e in range(4):
        pre = f"model.layers.0.mlp.experts.{e}"
        g = max(np.abs(gate[e]).max(), np.abs(up[e]).max())
        for p, w in (("gate_proj", gate[e]), ("up_proj", up[e])):
            assert st[f"{pre}.{p}.weight_quantizer._global_amax"] == F32(g)
            np.testing.assert_array_equal(st[f"{pre}.{p}.weight_quantizer._amax"], _sweep_brute_force(w, g),
                                          err_msg=f"{pre}.{p}")


# ----------------------------------------------------------------------------------------------- options
def test_options_are_parsed_by_the_algorithm():
    algo, opts = resolve_algorithm({"method": "mse", "fp8_scale_sweep": True, "step_size": 0.2,
                                    "layerwise": {"enable": False}, "distributed_sync": True})
    assert algo.name == "mse" and opts["settings"] == MseSettings(step_size=0.2, fp8_scale_sweep=True)
    assert resolve_algorithm("mse")[1]["settings"] == MseSettings()
    with pytest.raises(UnsupportedError, match="sync_expert_weight_amax"):  # a max option, not MseCalibConfig's
        resolve_algorithm({"method": "mse", "sync_expert_weight_amax": True})
    with pytest.raises(UnsupportedError, match="bogus"):
        resolve_algorithm({"method": "mse", "bogus": 1})
    with pytest.raises(UnsupportedError, match="moe_calib_experts_ratio"):
        resolve_algorithm({"method": "mse", "moe_calib_experts_ratio": 0.5})
    for bad in ({"step_size": 0}, {"start_multiplier": -1.0}, {"fp8_scale_sweep": "yes"},
                {"start_multiplier": 2.0, "stop_multiplier": 1.0}):
        with pytest.raises(RecipeError):
            resolve_algorithm({"method": "mse", **bad})


# ----------------------------------------------------------------------------------------------- export / CLI
def test_ptq_mse_recipe_exports_searched_block_scales(tmp_path, capsys):
    """``jaxquant ptq`` with ModelOpt's mse recipe: static NVFP4 MLP weights whose block scales differ from max's
    where the search moved them, each one an exact E4M3 code of the shared global scale; per block the exported
    weights are never further from the source weights than max's (its scale is one of the candidates)."""
    pytest.importorskip("jaxquant.export.hf")
    from _tiny_cli import cli_files

    from jaxquant.cli import main
    from jaxquant.export import load_quantized

    files = cli_files(tmp_path / "files")
    outs = {}
    for tag, recipe in (("max", "general/ptq/nvfp4_mlp_only-kv_fp8_cast"),
                        ("mse", "general/ptq/nvfp4_mlp_only_mse-kv_fp8_cast")):
        target = tmp_path / tag
        rc = main(["ptq", "--model", files["model"], "--dataset", files["calib"], "--calib-size", "8",
                   "--calib-seq", "24", "--batch-size", "4", "--eval-windows", "0", "--quiet", "--recipe", recipe,
                   "--export-path", str(target)])
        out, err = capsys.readouterr()
        assert rc == 0, err
        outs[tag] = {k: v for p in target.glob("*.safetensors") for k, v in _read(p).items()}
        if tag == "mse":
            assert "calibration (mse)" in out and "calibrate: weight search" in out
            loaded = load_quantized(target)  # the export reloads
            assert loaded is not None
    src = _read(Path(files["model"]) / "model.safetensors")
    n_diff = 0
    for k in (k for k in outs["mse"] if k.endswith("mlp.down_proj.weight_scale")):
        base = k[: -len(".weight_scale")]
        a, b = (np.asarray(outs[t][k]).astype(F32) for t in ("max", "mse"))
        assert np.array_equal(outs["max"][base + ".weight_scale_2"], outs["mse"][base + ".weight_scale_2"])
        n_diff += int(np.sum(a != b))
        w = src[base + ".weight"].astype(F32)
        err = {t: _block_err(outs[t], base, w) for t in outs}
        assert np.all(err["mse"] <= err["max"]), base
    assert n_diff > 0


def _read(path) -> dict:
    from jaxquant.io.safetensors import SafetensorsFile

    f = SafetensorsFile(path)
    out = {k: np.array(f.get(k)) for k in f.keys()}
    f.close()
    return out


def _block_err(tensors, base, w):
    from jaxquant.formats.registry import get

    deq = np.asarray(get("nvfp4").dequantize({s: tensors[f"{base}.{s}"] for s in
                                              ("weight", "weight_scale", "weight_scale_2")}))
    return ((deq - w) ** 2).reshape(w.shape[0], -1, 16).sum(-1)


# ----------------------------------------------------------------------------------------------- local Hessian
def test_local_hessian_statistic_and_search_equal_modelopts():
    """``block_hessian`` == ModelOpt's ``_LocalHessianAccumulator``; the Hessian-weighted FP8 scale sweep ==
    ``NVFP4MSECalibrator``'s reference sweep with its ``local_hessian_error`` (static kernel emulated, module doc)."""
    torch = pytest.importorskip("torch")
    from _numerics_ref import triton_static_np
    from modelopt.torch.quantization.calib.mse import NVFP4MSECalibrator
    from modelopt.torch.quantization.model_calib import _LocalHessianAccumulator

    from jaxquant.calibration.local_hessian import block_hessian
    from jaxquant.calibration.mse import search_amax

    rng = np.random.default_rng(5)
    cout, cin = 24, 64
    w = (rng.standard_t(3, (cout, cin)) * 0.05).astype(F32)
    xs = [(rng.standard_normal((3, 7, cin)) * rng.uniform(0.1, 4.0, cin)).astype(F32) for _ in range(2)]
    acc = _LocalHessianAccumulator(cout, cin, 16)
    h_sum, n = 0, 0
    for x in xs:
        acc.accumulate(torch.from_numpy(x))
        h, k = block_hessian(jnp.asarray(x), 16)
        h_sum, n = h_sum + np.asarray(h), n + int(k)
    assert n == acc.num_samples == 42
    ref_h = acc.hessian_per_block.numpy()
    diag = np.sqrt(np.einsum("nbb->nb", ref_h))
    bound = n * 2.0**-23 * diag[:, :, None] * diag[:, None, :]  # float32 summation of n products (Cauchy-Schwarz)
    assert np.all(np.abs(h_sum - ref_h) <= bound)
    hess = acc.normalized_hessian()
    error_func = acc.build_error_func()

    g = np.abs(w).max()
    blocks = w.reshape(-1, 16)
    bmax = np.abs(blocks).max(-1, keepdims=True)

    def quant(x, amax):
        return torch.from_numpy(triton_static_np(x.numpy().reshape(-1, 16), amax.numpy().reshape(-1, 1), g))

    cal = NVFP4MSECalibrator(amax=torch.from_numpy(bmax), global_amax=torch.tensor(g), axis=(0,), quant_func=quant,
                             error_func=error_func)
    cal.collect(torch.from_numpy(blocks))
    ref = cal.compute_amax().numpy().reshape(cout, -1)
    ours = np.asarray(search_amax(jnp.asarray(w), jnp.asarray(bmax.reshape(cout, -1)), jnp.float32(g),
                                  jnp.asarray(fp8_scale_candidates()), jnp.asarray(hess.numpy()), fmt="nvfp4_static",
                                  block_size=16, sweep=True, chunk=16, has_metric=True))
    plain = np.asarray(search_amax(jnp.asarray(w), jnp.asarray(bmax.reshape(cout, -1)), jnp.float32(g),
                                   jnp.asarray(fp8_scale_candidates()), fmt="nvfp4_static", block_size=16, sweep=True,
                                   chunk=16))
    np.testing.assert_array_equal(ours, ref)
    assert np.any(ours != plain)  # the Hessian weighting changes the choice


# ----------------------------------------------------------------------------------------------- dynamic NVFP4, layerwise
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 101, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": False, "max_position_embeddings": 64}
NVFP4_DYNAMIC = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


def _heavy_llama(seed=0):
    m = build_model(ModelConfig.from_hf_config(LLAMA), dtype=jnp.float32, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for layer in m.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
            w = np.asarray(mod.weight[...])
            mod.weight[...] = jnp.asarray(w * np.abs(rng.standard_t(2.5, w.shape)).clip(0, 30) ** 0.5)
    return m


def test_dynamic_nvfp4_weight_search_then_fused_unification():
    """Dynamic-block NVFP4 weights: the per-tensor amax is searched over the 39 multipliers (numpy brute force with
    the Triton kernel's emulation; ModelOpt's own needs CUDA), each sibling on its own; ``finalize`` then gives
    q/k/v the max of their searched amax (what ModelOpt's export does)."""
    from _numerics_ref import triton_dynamic_np

    m = _heavy_llama()
    cfg = _weights_only(NVFP4_DYNAMIC)
    r = quantize(m, cfg, None, progress=False)
    st = r.calibration_state
    mults = multipliers(MseSettings())
    searched = {}
    for p in "qkv":
        w = np.asarray(getattr(m.model.layers[0].self_attn, f"{p}_proj").weight[...])
        a0 = F32(np.abs(w).max())
        errs = [((w - triton_dynamic_np(w, a0 * c)) ** 2).sum() for c in mults]
        searched[p] = a0 * mults[int(np.argmin(errs))]
    assert len(set(searched.values())) > 1  # the siblings' own searches differ
    for p in "qkv":
        assert st[f"model.layers.0.self_attn.{p}_proj.weight_quantizer._amax"] == max(searched.values())


def test_layerwise_mse_gives_the_same_state():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 101, (4, 12)).astype(np.int32)
    batches = [(ids[:2], np.ones_like(ids[:2])), (ids[2:], np.ones_like(ids[2:]))]
    states = []
    for layerwise in (False, True):
        m = _heavy_llama()
        r = quantize(m, "general/ptq/nvfp4_mlp_only_mse-kv_fp8_cast", batches, progress=False, layerwise=layerwise)
        states.append(r.calibration_state)
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k], err_msg=k)
