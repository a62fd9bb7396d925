"""NVFP4_AWQ (NVFP4 with an AWQ ``pre_quant_scale``; hf_ptq ``--qformat nvfp4_awq_lite`` / ``_clip`` / ``_full``)
against nvidia-modelopt 0.47's ``export_hf_checkpoint`` on CPU.

ModelOpt's NVFP4 fake quant needs CUDA, so its AWQ search cannot run here; its max calibration (statistics only) and its
export can. The comparison therefore max-calibrates the tiny Llama with ModelOpt's ``nvfp4_awq_lite`` quant_cfg, gives
every linear's input quantizer a pre_quant_scale (random in [0.5, 2), in the model dtype) as AWQ would, exports with
ModelOpt, and hands jaxquant the same amax and pre_quant_scale. What must be byte-identical, and is: every tensor (the
down_proj scale folded into up_proj's rows and, without grouped-query heads, o_proj's into v_proj's; q/k/v and gate/up
averaged, re-smoothed and folded into the norms; o_proj's pre_quant_scale kept with grouped-query heads), and
hf_quant_config.json / config.json (``NVFP4_AWQ``, ``group_size`` 16, ``has_zero_point`` false, ``pre_quant_scale``
true; no config_groups). Then jaxquant's own ``nvfp4_awq_lite`` calibration exports, passes ``jaxquant check`` and
loads back (``load_quantized``) with the fake-quant model's logits.
"""

import copy
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R  # noqa: E402


def _llama(path, dtype, kv_heads, bias=False):
    """Tiny Llama: hidden 64, intermediate 96 (whole NVFP4 blocks of 16), 4 heads, ``kv_heads`` K/V heads (``bias``:
    random attention and MLP biases, which the export scales with the folded pre_quant_scale)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=False,
                      attention_bias=bias, mlp_bias=bias)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    m = m.to(getattr(torch, dtype))
    m.save_pretrained(str(path))
    return m


def _other(path, arch):
    """Tiny Qwen3 or Mistral (4 heads, 4 K/V heads, head_dim 16) with random norms."""
    import torch
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
    m = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**kw)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    m.save_pretrained(str(path))
    return m


def _cfg(weight_only: bool):
    """ModelOpt's nvfp4_awq_lite quant_cfg with max calibration (``weight_only``: input quantizers off)."""
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    cfg = copy.deepcopy(QUANT_CFG_CHOICES["nvfp4_awq_lite"])
    assert cfg["algorithm"] == "awq_lite"
    cfg["algorithm"] = "max"
    if weight_only:
        cfg["quant_cfg"].insert(2, {"quantizer_name": "*input_quantizer", "enable": False})
        del cfg["quant_cfg"][3]
    return cfg


def _set_pqs(model) -> dict:
    """Give every quantized linear's input quantizer a pre_quant_scale (model dtype); returns them as float32."""
    import torch

    g = torch.Generator().manual_seed(1)
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "input_quantizer") and mod.weight_quantizer.is_enabled:
            p = (torch.rand(mod.weight.shape[1], generator=g) * 1.5 + 0.5).to(mod.weight.dtype)
            mod.input_quantizer._enable_pre_quant_scale = True
            mod.input_quantizer.pre_quant_scale = p
            out[name + ".input_quantizer"] = p.float().numpy().copy()
    return out


def _jaxquant_load(src, cfg, amax, pqs, dtype):
    """load_hf + the recipe + ModelOpt's amax and pre_quant_scales; returns ``(loaded, resolution)``."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantizer_sites
    from jaxquant.converters import load_hf
    from jaxquant.recipe import apply_recipe

    loaded = load_hf(src, dtype=getattr(jnp, dtype))
    res = apply_recipe(loaded.model, copy.deepcopy(cfg), warn=False)
    seen = 0
    for s in quantizer_sites(loaded.model):
        name = s.names[0]
        if name in pqs:
            s.quantizer.set_pre_quant_scale(pqs[name])
            seen += 1
        if s.quantizer.enabled:
            s.quantizer.amax.value = jnp.asarray(amax[name], jnp.float32).reshape(s.quantizer.amax.value.shape)
    assert seen == len(pqs) == 14
    return loaded, res


def _jaxquant_export(src, cfg, amax, pqs, dtype, out):
    from jaxquant.export import export_hf

    loaded, res = _jaxquant_load(src, cfg, amax, pqs, dtype)
    export_hf(loaded, out, resolution=res)


@pytest.mark.parametrize("dtype,kv_heads,weight_only,bias", [("float32", 2, False, False), ("float32", 4, False, True),
                                                              ("bfloat16", 4, False, False), ("bfloat16", 2, True, True)])
def test_nvfp4_awq_byte_identical_to_modelopt(tmp_path, dtype, kv_heads, weight_only, bias):
    src = tmp_path / "src"
    model = _llama(src, dtype, kv_heads, bias)
    cfg = _cfg(weight_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amax = R.modelopt_quantize(model, cfg)
        pqs = _set_pqs(model)
        R.modelopt_export(model, tmp_path / "mo", dtype)
    _jaxquant_export(src, cfg, amax, pqs, dtype, tmp_path / "jq")
    ref = R.assert_same_export(tmp_path / "mo", tmp_path / "jq")

    q = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert (q["quant_algo"], q["group_size"], q["has_zero_point"], q["pre_quant_scale"]) == ("NVFP4_AWQ", 16, False,
                                                                                             True)
    assert "config_groups" not in R.json_of(tmp_path / "jq" / "config.json")["quantization_config"]
    layer = "model.layers.1."
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj"):  # folded into the norms, or (down_proj) into up_proj
        assert layer + m + ".pre_quant_scale" not in ref, m
    o_pqs = layer + "self_attn.o_proj.pre_quant_scale"
    assert (o_pqs in ref) == (kv_heads == 2)  # grouped-query heads: not folded into v_proj
    assert (layer + "mlp.up_proj.input_scale" in ref) == (not weight_only)
    assert ref[layer + "mlp.up_proj.weight"][:2] == ("U8", (96, 32))
    assert len({ref[layer + f"self_attn.{p}_proj.weight_scale_2"][2] for p in "qkv"}) == 1  # one per fused GEMM

    # jaxquant check reads NVFP4_AWQ's tensors (ModelOpt's and ours): only vLLM's refusal of the algo is reported
    from jaxquant.check import validate_checkpoint
    from jaxquant.io.safetensors import SafetensorsFile, save_file

    for d in ("mo", "jq"):
        assert validate_checkpoint(tmp_path / d).rules == {"quant-algo-unsupported"}, d
    if kv_heads != 2 or weight_only:
        return
    f = SafetensorsFile(tmp_path / "jq" / "model.safetensors")
    t = {k: np.array(f.get(k)) for k in f.tensors}
    f.close()
    s2 = layer + "mlp.up_proj.weight_scale_2"
    for key, bad, rule in ((o_pqs, np.zeros_like(t[o_pqs]), "scale-nonpositive"), (o_pqs, t[o_pqs][:-1], "scale-shape"),
                           (s2, None, "scale-missing")):
        save_file({k: v for k, v in {**t, key: bad}.items() if v is not None}, tmp_path / "jq" / "model.safetensors",
                  metadata={"format": "pt"})
        assert [x.rule for x in validate_checkpoint(tmp_path / "jq").findings if x.key == key] == [rule], key


@pytest.mark.parametrize("arch", ["Qwen3", "Mistral"])
def test_families(tmp_path, arch):
    """ModelOpt folds o_proj / down_proj into v_proj / up_proj for Qwen3's classes, not for Mistral's: its
    ``PQS_FUSE_MODULE_MAPPING`` names Llama and Qwen3 attention / MLP classes only. Byte-identical either way."""
    src = tmp_path / "src"
    model = _other(src, arch)
    cfg = _cfg(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amax = R.modelopt_quantize(model, cfg)
        pqs = _set_pqs(model)
        R.modelopt_export(model, tmp_path / "mo", "float32")
    _jaxquant_export(src, cfg, amax, pqs, "float32", tmp_path / "jq")
    ref = R.assert_same_export(tmp_path / "mo", tmp_path / "jq")
    kept = {k for k in ref if k.endswith("pre_quant_scale")}
    layers = range(2)
    want = set() if arch == "Qwen3" else {f"model.layers.{i}.{m}.pre_quant_scale" for i in layers
                                          for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert kept == want


def test_mixed_precision_config_group():
    """A MIXED_PRECISION checkpoint's NVFP4_AWQ group is ModelOpt's ``_quant_algo_to_group_config`` entry."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format as mo_convert

    from jaxquant.export.quant_config import convert_hf_quant_config_format

    entry = {"quant_algo": "NVFP4_AWQ", "group_size": 16, "has_zero_point": False, "pre_quant_scale": True}
    hq = {"producer": {"name": "x", "version": "0"},
          "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "exclude_modules": [],
                           "quantized_layers": {"a.q_proj": entry, "a.o_proj": {"quant_algo": "FP8"}}}}
    assert convert_hf_quant_config_format(copy.deepcopy(hq)) == mo_convert(copy.deepcopy(hq))


def _static_cfg(weight_only: bool) -> dict:
    """``_cfg`` with static NVFP4 weight blocks (what mse / local_hessian / gptq calibrate)."""
    cfg = _cfg(weight_only)
    cfg["quant_cfg"][1]["cfg"]["block_sizes"]["type"] = "static"
    return cfg


@pytest.mark.parametrize("dtype,kv_heads,weight_only", [("float32", 2, False), ("bfloat16", 4, True)])
def test_static_nvfp4_awq_byte_identical_to_modelopt(tmp_path, dtype, kv_heads, weight_only):
    """Static NVFP4 weights with an AWQ pre_quant_scale (awq_lite then gptq / mse) export as NVFP4_AWQ, byte for byte
    as ModelOpt does. ModelOpt max-calibrates and promotes the static weight quantizers (per-block ``_amax``, global
    amax = their max); a re-smoothed weight gets its per-block amax re-collected from the new weight and keeps the
    calibrated global amax. Without ``resmooth_keeps_global_amax`` the weight_scale_2 of every re-smoothed linear
    differs; without the static block amax the weight scales do."""
    import jax.numpy as jnp
    from modelopt.torch.quantization.nn import TensorQuantizer

    from jaxquant.calibration import quantizer_sites

    src = tmp_path / "src"
    model = _llama(src, dtype, kv_heads)
    cfg = _static_cfg(weight_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amax = R.modelopt_quantize(model, cfg)
        gamax = {n: m.global_amax.detach().float().numpy().copy() for n, m in model.named_modules()
                 if isinstance(m, TensorQuantizer) and getattr(m, "global_amax", None) is not None}
        assert len(gamax) == 14
        pqs = _set_pqs(model)
        R.modelopt_export(model, tmp_path / "mo", dtype)
    loaded, res = _jaxquant_load(src, cfg, amax, pqs, dtype)
    for s in quantizer_sites(loaded.model):
        if s.names[0] in gamax:
            s.quantizer.global_amax.value = jnp.asarray(gamax[s.names[0]], jnp.float32).reshape(
                s.quantizer.global_amax.value.shape)
    from jaxquant.export import export_hf

    export_hf(loaded, tmp_path / "jq", resolution=res)
    ref = R.assert_same_export(tmp_path / "mo", tmp_path / "jq")
    q = R.json_of(tmp_path / "jq" / "hf_quant_config.json")["quantization"]
    assert (q["quant_algo"], q["group_size"], q["pre_quant_scale"]) == ("NVFP4_AWQ", 16, True)
    assert ("model.layers.1.self_attn.o_proj.pre_quant_scale" in ref) == (kv_heads == 2)


def test_four_over_six_with_pre_quant_scale_refused(tmp_path):
    """Four-over-Six NVFP4 with a pre_quant_scale has no pqs_format: the export says so, naming the layer."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantizer_sites
    from jaxquant.converters import load_hf
    from jaxquant.errors import UnsupportedError
    from jaxquant.export import export_hf
    from jaxquant.recipe import apply_recipe

    src = tmp_path / "src"
    _llama(src, "float32", 2)
    loaded = load_hf(src, dtype=jnp.float32)
    cfg = _static_cfg(False)
    cfg["quant_cfg"][1]["cfg"]["block_sizes"]["four_over_six"] = True
    apply_recipe(loaded.model, cfg, warn=False)
    for s in quantizer_sites(loaded.model):
        if s.quantizer.enabled:
            s.quantizer.amax.value = jnp.ones_like(s.quantizer.amax.value)
            if getattr(s.quantizer, "global_amax", None) is not None:
                s.quantizer.global_amax.value = jnp.ones_like(s.quantizer.global_amax.value)
        if s.names[0].endswith("layers.0.mlp.down_proj.input_quantizer"):
            s.quantizer.set_pre_quant_scale(np.ones(96, np.float32))
    with pytest.raises(UnsupportedError, match=r"layers\.0\.mlp\.down_proj: a pre_quant_scale with format "
                                               r"nvfp4_static_four_over_six .*nvfp4_awq"):
        export_hf(loaded, tmp_path / "out")


# ----------------------------------------------------------------------------------------------- load back
def _batches():
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (2, 12), generator=g).numpy() for _ in range(2)]


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_power_of_two_scales_load_back_bit_exact(tmp_path, kv_heads):
    """With pre_quant_scales that are powers of two <= 1, the same for fused siblings, and 1 on the row of up_proj's
    / v_proj's largest weight, every export step (folding into norms, into up_proj / v_proj rows) is exact in float32
    and keeps each NVFP4 global scale, so the loaded checkpoint's logits equal the fake-quant model's bit for bit."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.export.load_quantized import load_quantized
    from jaxquant.io.safetensors import CheckpointFiles
    from jaxquant.recipe import apply_recipe

    src = tmp_path / "src"
    _llama(src, "float32", kv_heads)
    loaded = load_hf(src, dtype=jnp.float32)
    res = apply_recipe(loaded.model, _cfg(False), warn=False)
    rng = np.random.default_rng(0)

    def smooth(lin, p):
        lin.input_quantizer.set_pre_quant_scale(p)
        lin.weight_quantizer.set_pre_quant_scale(np.float32(1.0) / p)

    for layer in loaded.model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lins, n in (((a.q_proj, a.k_proj, a.v_proj), 64), ((a.o_proj,), 64), ((m.gate_proj, m.up_proj), 64),
                        ((m.down_proj,), 96)):
            p = (2.0 ** -rng.integers(0, 3, n)).astype(np.float32)
            for lin in lins:
                smooth(lin, p)
        for into, src_lin in ((m.up_proj, m.down_proj), (a.v_proj, a.o_proj)):
            w = np.asarray(into.weight_quantizer.scaled(jnp.asarray(into.weight[...])))
            p = np.array(src_lin.input_quantizer.pre_quant_scale.get_value())
            if p.shape[0] == w.shape[0]:
                p[np.abs(w).max(axis=1).argmax()] = 1.0
                smooth(src_lin, p)
    quantize(loaded.model, res, [(b, None) for b in _batches()], progress=False)
    ids = jnp.asarray(_batches()[0])
    ref = np.asarray(loaded.model(ids, None))
    export_hf(loaded, tmp_path / "out")
    names = set(CheckpointFiles.open(tmp_path / "out").keys())
    assert {n for n in names if n.endswith("pre_quant_scale")} == (
        {f"model.layers.{i}.self_attn.o_proj.pre_quant_scale" for i in range(2)} if kv_heads == 2 else set())
    got = np.asarray(load_quantized(tmp_path / "out", dtype=jnp.float32).model(ids, None))
    np.testing.assert_array_equal(got, ref)


def _assert_o_proj_loads_exactly(loaded, back, *, input_amax: bool) -> None:
    """Each layer's o_proj (it keeps its pre_quant_scale with grouped-query heads) loads bit for bit: its fake-quant
    weight, its pre_quant_scale and (``input_amax``) its input amax."""
    import jax.numpy as jnp

    for i in range(2):
        a, b = loaded.model.model.layers[i].self_attn.o_proj, back.model.model.layers[i].self_attn.o_proj
        np.testing.assert_array_equal(np.asarray(b.weight[...]), np.asarray(a.weight_quantizer(jnp.asarray(a.weight[...]))))
        np.testing.assert_array_equal(np.asarray(b.input_quantizer.pre_quant_scale.get_value()),
                                      np.asarray(a.input_quantizer.pre_quant_scale.get_value()))
        if input_amax:
            np.testing.assert_array_equal(np.asarray(b.input_quantizer.amax.get_value()),
                                          np.asarray(a.input_quantizer.amax.get_value()))


@pytest.mark.slow  # awq_lite's compile: about 30 s on 2 cores
def test_nvfp4_awq_lite_exports_and_loads_back(tmp_path):
    """jaxquant's own awq_lite on NVFP4 (ModelOpt's ``nvfp4_awq_lite`` config), exported and loaded. A linear whose
    export keeps its pre_quant_scale (o_proj, grouped-query heads) loads bit for bit: weight, pre_quant_scale and input
    amax. The others were re-smoothed to their siblings' mean scale and folded (as ModelOpt's export does), which
    re-rounds their NVFP4 weights: the loaded model is another NVFP4 rounding of the same smoothed model, so its logit
    error against the unquantized model must be of the fake-quant model's size (within 2x), not larger."""
    import jax.numpy as jnp
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    from jaxquant.calibration import quantize
    from jaxquant.check import validate_checkpoint
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.export.load_quantized import load_quantized

    src = tmp_path / "src"
    _llama(src, "float32", 2)
    loaded = load_hf(src, dtype=jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantize(loaded.model, copy.deepcopy(QUANT_CFG_CHOICES["nvfp4_awq_lite"]),
                       [(b, None) for b in _batches()], progress=False)
    assert len(res.stats.awq_alphas) == 14
    ids = jnp.asarray(_batches()[0])
    ref = np.asarray(loaded.model(ids, None))
    export_hf(loaded, tmp_path / "out")
    assert validate_checkpoint(tmp_path / "out").rules <= {"quant-algo-unsupported"}  # TensorRT-LLM only
    back = load_quantized(tmp_path / "out", dtype=jnp.float32, weights="dequantize")
    _assert_o_proj_loads_exactly(loaded, back, input_amax=True)
    got = np.asarray(back.model(ids, None))
    plain = load_hf(src, dtype=jnp.float32)
    exact = np.asarray(plain.model(ids, None))

    def err(x):
        return float(np.abs(x - exact).max() / np.abs(exact).max())

    print(f"nvfp4_awq_lite: relative logit error vs unquantized: fake quant {err(ref):.3f}, loaded export {err(got):.3f}")
    assert np.all(np.isfinite(got)) and err(got) < 2 * err(ref), (err(got), err(ref))


@pytest.mark.slow  # awq_lite's compile: about 25 s on 2 cores
def test_cli_ptq_nvfp4_awq_lite(tmp_path):
    """``jaxquant ptq --qformat nvfp4_awq_lite`` exports NVFP4_AWQ; the checkpoint validates and loads."""
    import sys
    from pathlib import Path

    import jaxquant as jq
    from jaxquant.cli import main

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _tiny_cli import cli_files

    files = cli_files(tmp_path)
    out = tmp_path / "awq"
    rc = main(["ptq", "--model", files["model"], "--dataset", files["calib"], "--calib-size", "8", "--calib-seq", "24",
               "--batch-size", "4", "--eval-windows", "0", "--qformat", "nvfp4_awq_lite", "--export-path", str(out),
               "--quiet"])
    assert rc == 0
    q = R.json_of(out / "hf_quant_config.json")["quantization"]
    assert (q["quant_algo"], q["group_size"], q["pre_quant_scale"]) == ("NVFP4_AWQ", 16, True)
    assert jq.validate_checkpoint(out).rules <= {"quant-algo-unsupported"}
    back = jq.load_quantized(out, dtype="float32")
    assert back.model.model.layers[0].self_attn.o_proj.input_quantizer.pre_quant_scale is not None


@pytest.mark.slow  # two algorithms' compiles: about 30 s on 2 cores
def test_awq_lite_then_gptq_exports_and_loads_back(tmp_path):
    """``[awq_lite, gptq]`` on static NVFP4 weights (jaxquant's own calibration): exports as NVFP4_AWQ, passes
    ``jaxquant check``, and loads back. o_proj keeps its pre_quant_scale (grouped-query heads), so its weight, scale
    and input amax load bit for bit; the whole model's logit error is of the fake-quant model's size (within 2x: the
    export re-smooths fused siblings and folds down_proj's scale into up_proj, as ModelOpt does)."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantize
    from jaxquant.check import validate_checkpoint
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.export.load_quantized import load_quantized

    src = tmp_path / "src"
    _llama(src, "float32", 2)
    loaded = load_hf(src, dtype=jnp.float32)
    cfg = _static_cfg(False)
    cfg["algorithm"] = [{"method": "awq_lite", "alpha_step": 0.5}, {"method": "gptq"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantize(loaded.model, cfg, [(b, None) for b in _batches()], progress=False)
    assert len(res.stats.awq_alphas) == 14
    ids = jnp.asarray(_batches()[0])
    ref = np.asarray(loaded.model(ids, None))
    export_hf(loaded, tmp_path / "out")
    q = R.json_of(tmp_path / "out" / "hf_quant_config.json")["quantization"]
    assert (q["quant_algo"], q["group_size"], q["pre_quant_scale"]) == ("NVFP4_AWQ", 16, True)
    assert validate_checkpoint(tmp_path / "out").rules <= {"quant-algo-unsupported"}
    back = load_quantized(tmp_path / "out", dtype=jnp.float32, weights="dequantize")
    _assert_o_proj_loads_exactly(loaded, back, input_amax=False)
    got = np.asarray(back.model(ids, None))
    exact = np.asarray(load_hf(src, dtype=jnp.float32).model(ids, None))

    def err(x):
        return float(np.abs(x - exact).max() / np.abs(exact).max())

    assert np.all(np.isfinite(got)) and err(got) < 2 * err(ref), (err(got), err(ref))
