"""Corpus test of ``jaxquant check``: real exports (jaxquant's and nvidia-modelopt's own, made here on CPU
from the same tiny models and amax) validate clean; copies with exactly one thing broken are caught with
the right rule id on the right key, and with no other rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.export")

import _export_modelopt_ref as R

from jaxquant.check import RULES, validate_checkpoint
from jaxquant.errors import CheckpointError
from jaxquant.io.safetensors import SafetensorsFile, save_file

CASES = {  # name -> (weight format, FP8 KV, mlp format)
    "fp8": ("fp8", False, None),
    "nvfp4_kv": ("nvfp4", True, None),
    "mixed": ("fp8", True, "nvfp4"),  # FP8 attention + NVFP4 mlp + FP8 KV = MIXED_PRECISION
}
L0 = "model.layers.0"
L1 = "model.layers.1"


def _make_qwen3_moe(root: Path):
    """Qwen3-MoE NVFP4 + FP8 KV, exported by ModelOpt (fused experts) and by jaxquant with ModelOpt's amax."""
    R.export_qwen3_moe_pair(root / "src_moe", root / "mo_moe", root / "jq_moe")


# Gemma 4 with both attention variants that lack projections (tests/export/test_export_gemma4_kv.py): layers 0-2
# own their KV cache (2 = full attention with k=v: no v_proj), layers 3-5 reuse the caches of layers 1 and 2.
GEMMA4 = dict(  # noqa: C408 - the kwargs of Gemma4TextConfig
    vocab_size=211, hidden_size=64, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, sliding_window=7,
    final_logit_softcapping=30.0, hidden_size_per_layer_input=0, num_kv_shared_layers=3, tie_word_embeddings=True,
    max_position_embeddings=128,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
)


def _make_gemma4(root: Path):
    """nvidia-modelopt's NVFP4 + FP8 KV export of a tiny Gemma 4 (it writes k/v scales for every layer)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma4TextConfig(**GEMMA4)
    config._attn_implementation = "eager"
    model = transformers.Gemma4ForCausalLM(config).eval()
    model.save_pretrained(str(root / "src_gemma4"))
    R.modelopt_quantize(model, R.modelopt_cfg("nvfp4", True))
    R.modelopt_export(model, root / "mo_gemma4", "float32")


def _make_calibrated(root: Path):
    """jaxquant's own calibration (quantize) and export: Mixtral NVFP4 + FP8 KV (w1/w3 experts) and Llama
    W4A16_NVFP4 with the fp8_cast KV preset (no KV scales)."""
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxquant.calibration import quantize
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.recipe import load_recipe, preset_recipe

    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
    )).eval().save_pretrained(str(root / "src_mixtral"))
    ids = np.random.default_rng(0).integers(0, 96, (4, 16)).astype(np.int32)
    for src, recipe, out in [("src_mixtral", load_recipe("general/ptq/nvfp4_default-kv_fp8"), "jq_mixtral"),
                             ("src_fp8", preset_recipe("w4a16_nvfp4"), "jq_w4a16_kv_cast")]:
        loaded = load_hf(root / src, dtype=jnp.float32)
        quantize(loaded.model, recipe, (ids, np.ones_like(ids)), batch_size=2, progress=False)
        export_hf(loaded, root / out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """``{"jq_fp8": dir, "mo_fp8": dir, ..., "src": an unquantized HF checkpoint}``."""
    from jaxquant.export import export_hf

    root = tmp_path_factory.mktemp("corpus")
    out = {}
    for case, (wf, kv, mlp) in CASES.items():
        src = root / f"src_{case}"
        model = R.make_llama(src, tie=False)
        amax = R.modelopt_quantize(model, R.modelopt_cfg(wf, kv, mlp))
        R.modelopt_export(model, root / f"mo_{case}", "float32")
        loaded = R.load_into_jaxquant(src, R.jaxquant_configs(wf, kv, mlp), amax, "float32")
        export_hf(loaded, root / f"jq_{case}")
        out[f"mo_{case}"], out[f"jq_{case}"] = root / f"mo_{case}", root / f"jq_{case}"
    model = R.make_llama(root / "src_tied_q", tie=True, dtype="bfloat16")
    amax = R.modelopt_quantize(model, R.modelopt_cfg("nvfp4", True))
    R.modelopt_export(model, root / "mo_tied_bf16", "bfloat16")
    _make_qwen3_moe(root)
    _make_gemma4(root)
    _make_calibrated(root)
    out.update(jq_mixtral=root / "jq_mixtral", jq_w4a16_kv_cast=root / "jq_w4a16_kv_cast",
               mo_tied_bf16=root / "mo_tied_bf16", mo_moe=root / "mo_moe", jq_moe=root / "jq_moe",
               mo_gemma4=root / "mo_gemma4", src=root / "src_fp8")
    return out


# ----------------------------------------------------------------------------------------------- mutation helpers
def _copy(corpus, base: str, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(corpus[base], d)
    return d


def _tensors(d: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(d / "model.safetensors")
    return {k: np.array(f.get(k)) for k in f.tensors}


def _write(d: Path, tensors: dict[str, np.ndarray]):
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _edit_tensors(d: Path, fn):
    t = _tensors(d)
    fn(t)
    _write(d, t)


def _edit_json(d: Path, file: str, fn):
    p = d / file
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data, indent=2))


def _edit_quant(d: Path, fn_hq, fn_cq=None):
    """Edit hf_quant_config.json's "quantization" block and (optionally) config.json's quantization_config."""
    _edit_json(d, "hf_quant_config.json", lambda j: fn_hq(j["quantization"]))
    if fn_cq is not None:
        _edit_json(d, "config.json", lambda j: fn_cq(j["quantization_config"]))


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32).reshape(())


def _set(name, value):
    def fn(t):
        t[name] = np.asarray(value, t[name].dtype).reshape(t[name].shape)
    return fn


def _set_block(name, byte: int, index=(0, 0)):
    """Set one F8_E4M3 block scale to a raw byte (0x7F = NaN, 0x00 = zero, 0xB8 = -1.0)."""
    def fn(t):
        a = t[name].view(np.uint8).copy()
        a[index] = byte
        t[name] = a.view(ml_dtypes.float8_e4m3fn)
    return fn


def _drop(*names):
    def fn(t):
        for n in names:
            del t[n]
    return fn


def _exclude_add(entry):
    return (lambda q: q["exclude_modules"].append(entry), lambda c: c["ignore"].append(entry))


def _exclude_remove(entry):
    return (lambda q: q["exclude_modules"].remove(entry), lambda c: c["ignore"].remove(entry))


def _quantize_lm_head_fp8(t):
    w = t["lm_head.weight"].astype(np.float32)
    s = np.float32(np.abs(w).max() / 448.0)
    t["lm_head.weight"] = (w / s).astype(ml_dtypes.float8_e4m3fn)
    t["lm_head.weight_scale"] = _f32(s)
    t["lm_head.input_scale"] = _f32(0.01)


def _unquantize(mod: str):
    """Replace an FP8 linear by its dequantized float32 weight (scales dropped)."""
    def fn(t):
        t[mod + ".weight"] = t[mod + ".weight"].astype(np.float32) * t[mod + ".weight_scale"].astype(np.float32)
        for s in ("weight_scale", "input_scale"):
            t.pop(f"{mod}.{s}", None)
    return fn


def _u8_weight(mod: str):
    def fn(t):
        o, i = t[mod + ".weight"].shape
        t[mod + ".weight"] = np.zeros((o, i // 2), np.uint8)
    return fn


def _set_layer_algo(layer: str, algo: str):
    def fn(q):
        q["quantized_layers"][layer]["quant_algo"] = algo
    return (fn, fn)


# ----------------------------------------------------------------------------------------------- intact exports
def test_every_intact_export_validates_clean(corpus):
    for name, d in corpus.items():
        if name == "src":
            continue
        r = validate_checkpoint(d)
        assert r.ok, f"{name}:\n{r.format()}"
        assert r.n_quantized > 0 and not r.unreadable
        assert validate_checkpoint(d, deep=True).ok, name


def test_intact_exports_declare_what_they_hold(corpus):
    assert validate_checkpoint(corpus["jq_nvfp4_kv"]).quant_algo == "NVFP4"
    assert validate_checkpoint(corpus["mo_mixed"]).quant_algo == "MIXED_PRECISION"
    assert validate_checkpoint(corpus["jq_moe"]).kv_cache_quant_algo == "FP8"


def test_directory_name_does_not_matter(corpus, tmp_path):
    """The exporter validates inside its temporary directory (name with .jaxquant-tmp-, marker file present)."""
    d = tmp_path / ".out.jaxquant-tmp-abc123"
    shutil.copytree(corpus["jq_nvfp4_kv"], d)
    (d / ".jaxquant-export-incomplete").write_text("in progress\n")
    assert validate_checkpoint(d).ok


def test_source_checkpoint_is_not_quantized(corpus):
    r = validate_checkpoint(corpus["src"])
    assert [(f.key, f.rule) for f in r.findings] == [("config.json", "not-quantized")]


# ----------------------------------------------------------------------------------------------- one break per copy
# (id, base export, (tensor edit, hf_quant edit, config.json edit), expected {(key, rule)})
BREAKS = [
    ("nan-input-scale", "jq_nvfp4_kv", (_set(f"{L0}.self_attn.q_proj.input_scale", np.nan), None, None),
     {(f"{L0}.self_attn.q_proj.input_scale", "scale-nonfinite")}),
    ("inf-fp8-weight-scale", "mo_fp8", (_set(f"{L1}.self_attn.o_proj.weight_scale", np.inf), None, None),
     {(f"{L1}.self_attn.o_proj.weight_scale", "scale-nonfinite")}),
    ("zero-weight-scale-2", "mo_nvfp4_kv", (_set(f"{L0}.mlp.down_proj.weight_scale_2", 0.0), None, None),
     {(f"{L0}.mlp.down_proj.weight_scale_2", "scale-nonpositive")}),
    ("negative-k-scale", "jq_nvfp4_kv", (_set(f"{L1}.self_attn.k_proj.k_scale", -0.01), None, None),
     {(f"{L1}.self_attn.k_proj.k_scale", "scale-nonpositive")}),
    ("zero-input-scale-fp8", "jq_mixed", (_set(f"{L0}.self_attn.o_proj.input_scale", 0.0), None, None),
     {(f"{L0}.self_attn.o_proj.input_scale", "scale-nonpositive")}),
    ("nan-block-scale", "mo_nvfp4_kv", (_set_block(f"{L0}.mlp.up_proj.weight_scale", 0x7F, (3, 1)), None, None),
     {(f"{L0}.mlp.up_proj.weight_scale", "scale-nonfinite")}),
    ("negative-block-scale", "jq_mixed", (_set_block(f"{L1}.mlp.gate_proj.weight_scale", 0xB8), None, None),
     {(f"{L1}.mlp.gate_proj.weight_scale", "scale-nonpositive")}),
    ("zero-block-scale-is-legal", "jq_nvfp4_kv", (_set_block(f"{L0}.mlp.up_proj.weight_scale", 0x00), None, None),
     set()),
    ("drop-k-scale", "jq_nvfp4_kv", (_drop(f"{L1}.self_attn.k_proj.k_scale"), None, None),
     {(f"{L1}.self_attn.k_proj.k_scale", "kv-scale-missing")}),
    ("drop-v-scale-modelopt", "mo_mixed", (_drop(f"{L0}.self_attn.v_proj.v_scale"), None, None),
     {(f"{L0}.self_attn.v_proj.v_scale", "kv-scale-missing")}),
    ("drop-all-kv-scales-jaxquant-calibrated", "jq_nvfp4_kv",
     (_drop(*(f"{L}.self_attn.{p}" for L in (L0, L1) for p in ("k_proj.k_scale", "v_proj.v_scale"))), None, None),
     {(f"{L}.self_attn.{p}", "kv-scale-missing") for L in (L0, L1) for p in ("k_proj.k_scale", "v_proj.v_scale")}),
    ("drop-all-kv-scales-is-a-cast-export", "mo_nvfp4_kv",
     (_drop(*(f"{L}.self_attn.{p}" for L in (L0, L1) for p in ("k_proj.k_scale", "v_proj.v_scale"))), None, None),
     set()),
    ("kv-scales-without-kv-algo", "mo_nvfp4_kv",
     (None, lambda q: q.update(kv_cache_quant_algo=None), lambda c: c.pop("kv_cache_scheme")),
     {(f"{L}.self_attn.{p}", "kv-scale-unexpected") for L in (L0, L1) for p in ("k_proj.k_scale", "v_proj.v_scale")}),
    ("qkv-weight-scale-2-differ", "jq_nvfp4_kv",
     (lambda t: t.update({f"{L0}.self_attn.k_proj.weight_scale_2": t[f"{L0}.self_attn.k_proj.weight_scale_2"] * 2}),
      None, None),
     {(f"{L0}.self_attn.k_proj.weight_scale_2", "fused-scale-mismatch")}),
    ("gate-up-input-scale-differ", "mo_mixed",
     (lambda t: t.update({f"{L1}.mlp.up_proj.input_scale": t[f"{L1}.mlp.up_proj.input_scale"] * 2}), None, None),
     {(f"{L1}.mlp.up_proj.input_scale", "fused-scale-mismatch")}),
    ("expert-w1-w3-weight-scale-2-differ", "jq_moe",
     (lambda t: t.update({f"{L0}.mlp.experts.2.up_proj.weight_scale_2":
                          t[f"{L0}.mlp.experts.2.up_proj.weight_scale_2"] * 2}), None, None),
     {(f"{L0}.mlp.experts.2.up_proj.weight_scale_2", "fused-scale-mismatch")}),
    ("v-proj-unquantized-beside-fp8-q-k", "mo_fp8",
     (_unquantize(f"{L0}.self_attn.v_proj"), *_exclude_add(f"{L0}.self_attn.v_proj")),
     {(f"{L0}.self_attn.v_proj.weight", "fused-format-mismatch")}),
    ("quant-algo-int8", "jq_fp8",
     (None, lambda q: q.update(quant_algo="INT8"), lambda c: c.update(quant_algo="INT8")),
     {("hf_quant_config.json:quant_algo", "quant-algo-unsupported")}),
    ("kv-algo-int8", "jq_nvfp4_kv",
     (None, lambda q: q.update(kv_cache_quant_algo="INT8"), lambda c: c.update(kv_cache_scheme="INT8")),
     {("hf_quant_config.json:kv_cache_quant_algo", "kv-algo-unsupported")}),
    ("mixed-layer-awq", "mo_mixed", (None, *_set_layer_algo(f"{L0}.mlp.down_proj", "W4A8_AWQ")),
     {(f"hf_quant_config.json:quantized_layers.{L0}.mlp.down_proj", "mixed-layer-algo-unsupported"),
      (f"{L0}.mlp.down_proj.weight_scale", "scale-dtype")}),  # W4A8_AWQ's INT4 block scales are F32, not E4M3
    ("mixed-layer-not-listed", "jq_mixed",
     (None, lambda q: q["quantized_layers"].pop(f"{L1}.self_attn.o_proj"),
      lambda c: c["quantized_layers"].pop(f"{L1}.self_attn.o_proj")),
     {(f"{L1}.self_attn.o_proj.weight", "mixed-layer-missing")}),
    ("drop-group-size", "mo_nvfp4_kv", (None, lambda q: q.pop("group_size"), None),
     {("hf_quant_config.json:quantization.group_size", "required-key-missing")}),
    ("drop-kv-cache-quant-algo-key", "jq_fp8", (None, lambda q: q.pop("kv_cache_quant_algo"), None),
     {("hf_quant_config.json:quantization.kv_cache_quant_algo", "required-key-missing")}),
    ("config-json-disagrees", "jq_nvfp4_kv", (None, None, lambda c: c.update(quant_algo="FP8")),
     {("config.json:quantization_config.quant_algo", "config-mismatch")}),
    ("config-json-ignore-disagrees", "mo_fp8", (None, None, lambda c: c["ignore"].append("model.layers.0.mlp*")),
     {("config.json:quantization_config.ignore", "config-mismatch")}),
    ("exclude-entry-matches-nothing", "jq_nvfp4_kv", (None, *_exclude_add("model.layers.7.mlp*")),
     {("hf_quant_config.json:exclude_modules['model.layers.7.mlp*']", "exclude-unmatched")}),
    ("lm-head-not-excluded", "mo_nvfp4_kv", (None, *_exclude_remove("lm_head")),
     {("lm_head.weight", "exclude-missing")}),
    ("tied-lm-head-not-excluded", "mo_tied_bf16", (None, *_exclude_remove("lm_head")),
     {("lm_head", "exclude-missing")}),
    ("lm-head-quantized-but-excluded", "jq_fp8", (_quantize_lm_head_fp8, None, None),
     {("lm_head.weight", "lm-head-quantized-excluded")}),
    ("exclude-covers-a-quantized-linear", "mo_fp8", (None, *_exclude_add(f"{L0}.self_attn.o_proj")),
     {(f"{L0}.self_attn.o_proj.weight", "exclude-matches-quantized")}),
    ("weight-scale-2-f16", "jq_nvfp4_kv",
     (lambda t: t.update({f"{L1}.mlp.down_proj.weight_scale_2": t[f"{L1}.mlp.down_proj.weight_scale_2"].astype(
         np.float16)}), None, None),
     {(f"{L1}.mlp.down_proj.weight_scale_2", "scale-dtype")}),
    ("block-scale-wrong-shape", "mo_nvfp4_kv",
     (lambda t: t.update({f"{L0}.mlp.down_proj.weight_scale": t[f"{L0}.mlp.down_proj.weight_scale"][:, :-1].copy()}),
      None, None),
     {(f"{L0}.mlp.down_proj.weight_scale", "scale-shape")}),
    ("fp8-weight-scale-per-channel", "jq_fp8",
     (lambda t: t.update({f"{L0}.self_attn.o_proj.weight_scale": np.full(64, 0.01, np.float32)}), None, None),
     {(f"{L0}.self_attn.o_proj.weight_scale", "scale-shape")}),
    ("u8-weight-under-fp8", "mo_fp8", (_u8_weight(f"{L1}.mlp.down_proj"), None, None),
     {(f"{L1}.mlp.down_proj.weight", "format-mismatch")}),
    ("drop-weight-scale", "jq_fp8", (_drop(f"{L0}.mlp.down_proj.weight_scale"), None, None),
     {(f"{L0}.mlp.down_proj.weight_scale", "scale-missing")}),
    ("drop-nvfp4-input-scale", "mo_nvfp4_kv", (_drop(f"{L1}.self_attn.o_proj.input_scale"), None, None),
     {(f"{L1}.self_attn.o_proj.input_scale", "scale-missing")}),
    ("mixed-layers-empty", "mo_mixed", (None, lambda q: q.update(quantized_layers={}),
                                        lambda c: c.update(quantized_layers={})),
     {("hf_quant_config.json:quantized_layers", "mixed-layers-empty")}
     | {(f"{L}.{m}.weight", "mixed-layer-missing") for L in (L0, L1)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")}),
    ("expert-input-scale-zero", "jq_moe", (_set(f"{L1}.mlp.experts.3.down_proj.input_scale", 0.0), None, None),
     {(f"{L1}.mlp.experts.3.down_proj.input_scale", "expert-input-scale")}),
    ("expert-input-scale-missing", "mo_moe", (_drop(f"{L0}.mlp.experts.1.down_proj.input_scale"), None, None),
     {(f"{L0}.mlp.experts.1.down_proj.input_scale", "expert-input-scale")}),
    ("gemma4-drop-k-scale-of-a-cache-owner", "mo_gemma4", (_drop("model.layers.1.self_attn.k_proj.k_scale"), None,
                                                            None),
     {("model.layers.1.self_attn.k_proj.k_scale", "kv-scale-missing")}),
    ("gemma4-drop-v-scale-of-a-k-eq-v-layer", "mo_gemma4", (_drop("model.layers.2.self_attn.v_proj.v_scale"), None,
                                                             None),
     {("model.layers.2.self_attn.v_proj.v_scale", "kv-scale-missing")}),
    ("gemma4-kv-shared-layers-need-no-scales", "mo_gemma4",
     (_drop(*(f"model.layers.{i}.self_attn.{p}" for i in (3, 4, 5) for p in ("k_proj.k_scale", "v_proj.v_scale"))),
      None, None),
     set()),
    ("mixtral-w1-w3-weight-scale-2-differ", "jq_mixtral",
     (lambda t: t.update({f"{L1}.block_sparse_moe.experts.0.w3.weight_scale_2":
                          t[f"{L1}.block_sparse_moe.experts.0.w3.weight_scale_2"] * 3}), None, None),
     {(f"{L1}.block_sparse_moe.experts.0.w3.weight_scale_2", "fused-scale-mismatch")}),
    ("mixtral-expert-input-scale-nan", "jq_mixtral",
     (_set(f"{L0}.block_sparse_moe.experts.2.w2.input_scale", np.nan), None, None),
     {(f"{L0}.block_sparse_moe.experts.2.w2.input_scale", "expert-input-scale")}),
    ("input-scale-on-weight-only-nvfp4", "jq_w4a16_kv_cast",
     (lambda t: t.update({f"{L0}.self_attn.o_proj.input_scale": _f32(0.02)}), None, None),
     {(f"{L0}.self_attn.o_proj.input_scale", "scale-unexpected")}),
    ("router-not-excluded", "mo_moe", (None, *_exclude_remove(f"{L1}.mlp.gate")),
     {(f"{L1}.mlp.gate.weight", "exclude-missing")}),
]


@pytest.mark.parametrize("case", BREAKS, ids=[b[0] for b in BREAKS])
def test_each_break_is_caught_by_its_rule(corpus, tmp_path, case):
    _, base, (tensors, hq, cq), expected = case
    d = _copy(corpus, base, tmp_path)
    if tensors is not None:
        _edit_tensors(d, tensors)
    if hq is not None or cq is not None:
        _edit_quant(d, hq or (lambda q: None), cq)
    r = validate_checkpoint(d)
    got = {(f.key, f.rule) for f in r.findings}
    assert got == expected, r.format()
    assert all(f.rule in RULES for f in r.findings)
    assert all(f.message and f.key in f.format() for f in r.findings)
    if expected:
        assert not r.ok and not r.unreadable
        with pytest.raises(CheckpointError, match="fails validation"):
            r.raise_if_findings()


def test_every_rule_has_a_break():
    """Each rule id is caught by some test in this file (BREAKS or the dedicated tests below)."""
    covered = {rule for case in BREAKS for _, rule in case[3]}
    covered |= {"unreadable", "not-quantized", "quant-config-missing", "weight-nonfinite"}  # tests below / above
    covered |= {"kv-bias-unexpected"}  # test_export_kv_affine.py::test_check_rules_for_affine_kv_biases
    assert covered == set(RULES)


def test_no_quantization_config_is_caught(corpus, tmp_path):
    d = _copy(corpus, "jq_fp8", tmp_path)
    (d / "hf_quant_config.json").unlink()
    _edit_json(d, "config.json", lambda c: c.pop("quantization_config"))
    r = validate_checkpoint(d)
    assert {(f.key, f.rule) for f in r.findings} == {("hf_quant_config.json", "quant-config-missing")}


def test_deep_decodes_weights(corpus, tmp_path):
    d = _copy(corpus, "mo_fp8", tmp_path)

    def nan_in(t):
        w = t[f"{L0}.mlp.up_proj.weight"].view(np.uint8).copy()
        w[5, 7] = 0x7F  # F8_E4M3 NaN
        t[f"{L0}.mlp.up_proj.weight"] = w.view(ml_dtypes.float8_e4m3fn)
        e = t["model.embed_tokens.weight"].copy()
        e[3, 2] = np.inf
        t["model.embed_tokens.weight"] = e

    _edit_tensors(d, nan_in)
    assert validate_checkpoint(d).ok  # headers and scales only: the weights are not read
    r = validate_checkpoint(d, deep=True)
    assert {(f.key, f.rule) for f in r.findings} == {(f"{L0}.mlp.up_proj.weight", "weight-nonfinite"),
                                                     ("model.embed_tokens.weight", "weight-nonfinite")}


def test_raise_if_findings_is_a_checkpoint_error(corpus, tmp_path):
    d = _copy(corpus, "jq_nvfp4_kv", tmp_path)
    _edit_tensors(d, _drop(f"{L1}.self_attn.k_proj.k_scale"))
    with pytest.raises(CheckpointError, match=r"k_proj\.k_scale: \[kv-scale-missing\]"):
        validate_checkpoint(d).raise_if_findings()
    validate_checkpoint(corpus["jq_nvfp4_kv"]).raise_if_findings()  # clean: no exception


# ----------------------------------------------------------------------------------------------- unreadable
def _corrupt_header(d: Path):
    p = d / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:16] = b"\xff" * 8  # the JSON header is no longer JSON
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize("breakage,key", [
    (lambda d: (d / "config.json").unlink(), "config.json"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    (_corrupt_header, "model.safetensors"),
    (lambda d: (d / "hf_quant_config.json").write_text("{not json"), "hf_quant_config.json"),
], ids=["no-config-json", "no-safetensors", "corrupt-header", "bad-hf-quant-json"])
def test_unreadable_checkpoints(corpus, tmp_path, breakage, key):
    d = _copy(corpus, "jq_fp8", tmp_path)
    breakage(d)
    r = validate_checkpoint(d)
    assert r.unreadable and not r.ok
    assert [(f.key, f.rule) for f in r.findings] == [(key, "unreadable")]


# ----------------------------------------------------------------------------------------------- the command
def test_cli_exit_codes(corpus, tmp_path, capsys):
    from jaxquant.cli import main

    assert main(["check", str(corpus["mo_nvfp4_kv"])]) == 0
    assert "OK" in capsys.readouterr().out

    d = _copy(corpus, "jq_nvfp4_kv", tmp_path)
    _edit_tensors(d, _set(f"{L0}.mlp.down_proj.weight_scale_2", np.nan))
    assert main(["check", str(d)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{L0}.mlp.down_proj.weight_scale_2: [scale-nonfinite] ")
    assert "1 finding" in out[-1]
    assert main(["check", "--quiet", str(d)]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 1

    (d / "config.json").unlink()
    assert main(["check", str(d)]) == 2
    assert "[unreadable]" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "absent")]) == 2
