"""Test helper: the same tiny model quantized and exported by nvidia-modelopt (CPU) and by jaxquant.

ModelOpt's NVFP4 *fake quant* needs CUDA, but max calibration (statistics only) and the export run
on CPU: calibrate there, read every amax back, hand the same amax to jaxquant's quantizers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

FP8 = {"num_bits": (4, 3), "axis": None}
NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


def modelopt_cfg(weight_fmt, kv: bool, mlp_fmt=None):
    """A ModelOpt quant_cfg list: one format everywhere, or (weight_fmt for attention, mlp_fmt for mlp)."""
    spec = {"fp8": FP8, "nvfp4": NVFP4}
    q = [{"quantizer_name": "*", "enable": False}]
    q.append({"quantizer_name": "*weight_quantizer", "cfg": spec[weight_fmt]})
    q.append({"quantizer_name": "*input_quantizer", "cfg": spec[weight_fmt]})
    if mlp_fmt:
        q.append({"quantizer_name": "*mlp*weight_quantizer", "cfg": spec[mlp_fmt]})
        q.append({"quantizer_name": "*mlp*input_quantizer", "cfg": spec[mlp_fmt]})
    if kv:
        q.append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": FP8})
    q.append({"quantizer_name": "*lm_head*", "enable": False})
    q.append({"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False})
    return {"quant_cfg": q, "algorithm": "max"}


def jaxquant_configs(weight_fmt, kv: bool, mlp_fmt=None):
    """The same rules as QuantizerConfigs keyed by a predicate on the quantizer name."""
    from jaxquant.quantizer.config import BlockSizes, QuantizerConfig

    spec = {
        "fp8": QuantizerConfig(num_bits=(4, 3)),
        "nvfp4": QuantizerConfig(num_bits=(2, 1), block_sizes=BlockSizes(size=16, type="dynamic", scale_bits=(4, 3))),
    }

    def resolve(name: str):
        if "lm_head" in name or "embed_tokens" in name:  # modelopt_cfg's lm_head and nn.Embedding exclusions
            return None
        if name.endswith(("k_bmm_quantizer", "v_bmm_quantizer")):
            return spec["fp8"] if kv else None
        if name.endswith(("weight_quantizer", "input_quantizer")):
            if mlp_fmt and ".mlp." in name:
                return spec[mlp_fmt]
            return spec[weight_fmt]
        return None

    return resolve


def make_llama(path: Path, *, tie: bool, dtype: str = "float32", seed: int = 0, extra=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    m = m.to(getattr(torch, dtype))
    m.save_pretrained(str(path))
    return m


def modelopt_quantize(model, cfg, seed: int = 0):
    """Max-calibrate on CPU; return {quantizer name: amax numpy} read before export mutates it."""
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer  # and its subclasses (static block quantizers)

    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, model.config.vocab_size, (2, 12), generator=g) for _ in range(2)]

    def loop(m):
        for b in batches:
            m(b)

    mtq.quantize(model, copy.deepcopy(cfg), forward_loop=loop)
    amax = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TensorQuantizer) and mod.is_enabled and getattr(mod, "_amax", None) is not None:
            amax[name] = mod._amax.detach().float().numpy().copy()
    return amax


def modelopt_biases(model) -> dict:
    """{quantizer name: calibrated affine bias (ModelOpt ``_bias_value``, float32 numpy)} of an affine KV model."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: mod._bias_value.detach().float().numpy().copy() for name, mod in model.named_modules()
            if isinstance(mod, TensorQuantizer) and getattr(mod, "_bias_value", None) is not None}


def modelopt_export(model, out: Path, dtype):
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model, export_dir=str(out), dtype=getattr(torch, dtype))


def load_into_jaxquant(src: Path, resolve, amax: dict, dtype: str):
    """load_hf + configure every quantizer with ``resolve(name)`` + set ModelOpt's amax."""
    import jax.numpy as jnp

    from jaxquant.converters import iter_quantizers, load_hf

    loaded = load_hf(src, dtype=getattr(jnp, dtype))
    for name, q in list(iter_quantizers(loaded.model, loaded.name_map)):
        cfg = resolve(name)
        q.configure(cfg)
        if cfg is not None:
            if name in amax:
                q.amax.value = jnp.asarray(amax[name], jnp.float32).reshape(q.amax.value.shape)
            elif cfg.fixed_amax is None and name.endswith("weight_quantizer"):
                raise AssertionError(f"no modelopt amax for {name}")
    return loaded


def tensors_of(d: Path) -> dict:
    from jaxquant.io.safetensors import CheckpointFiles

    ck = CheckpointFiles.open(d)
    return {k: (ck.tensor_info(k).dtype, ck.tensor_info(k).shape, np.asarray(ck.get(k)).tobytes()) for k in ck.keys()}


def json_of(p: Path) -> dict:
    return json.loads(p.read_text())


def export_qwen3_moe_pair(src: Path, mo_out: Path, jq_out: Path, num_experts: int = 4, weight_fmt: str = "nvfp4",
                          mlp_fmt: str | None = None, exclude_router: bool = True) -> None:
    """A tiny Qwen3-MoE saved by transformers at ``src``, ``weight_fmt`` (``mlp_fmt`` in the MLP when given) + FP8 KV:
    exported by nvidia-modelopt (transformers-5 fused experts) to ``mo_out`` and by jaxquant, given ModelOpt's amax,
    to ``jq_out``."""
    import re

    import jax.numpy as jnp
    import torch
    import transformers

    from jaxquant.converters import iter_quantizers, load_hf
    from jaxquant.export import export_hf

    torch.manual_seed(0)
    E = num_experts
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, intermediate_size=80,
                                      moe_intermediate_size=32, head_dim=16, num_experts=E, num_experts_per_tok=2,
                                      norm_topk_prob=True)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(str(src))
    mo_cfg = modelopt_cfg(weight_fmt, True, mlp_fmt)
    if exclude_router:
        mo_cfg["quant_cfg"] += [{"quantizer_name": "*mlp.gate.*", "enable": False}]
    amax = modelopt_quantize(model, mo_cfg)
    modelopt_export(model, mo_out, "float32")

    def mo_amax(name):
        m = re.match(r"(.*\.experts)\.(gate_proj|up_proj|down_proj)_(weight|input)_quantizer$", name)
        if not m:
            return amax.get(name)
        p, proj, role = m.groups()
        base = "down_proj" if proj == "down_proj" else "gate_up_proj"
        if role == "input":
            return np.full(E, float(amax[f"{p}.{base}_input_quantizer"].reshape(())), np.float32)
        return np.array([float(amax[f"{p}.{base}_weight_quantizers.{e}"].reshape(())) for e in range(E)], np.float32)

    loaded = load_hf(src, dtype=jnp.float32)
    resolve = jaxquant_configs(weight_fmt, True, mlp_fmt)
    for name, q in iter_quantizers(loaded.model, loaded.name_map):
        c = None if ".mlp.gate." in name + "." else resolve(name)
        q.configure(c)
        if c is not None:
            q.amax.value = jnp.asarray(mo_amax(name), jnp.float32).reshape(q.amax.value.shape)
    export_hf(loaded, jq_out)


def export_recipe_like_modelopt(src: Path, cfg: dict, amax: dict, dtype: str, out: Path, n_enabled: int,
                                biases: dict | None = None) -> None:
    """jaxquant's side of a comparison: load ``src``, apply the ModelOpt-style ``cfg`` (jaxquant reads it as a
    recipe), set every enabled static quantizer's amax to ModelOpt's (``n_enabled`` of them), export to ``out``."""
    import jax.numpy as jnp

    from jaxquant.calibration import quantizer_sites
    from jaxquant.converters import load_hf
    from jaxquant.export import export_hf
    from jaxquant.recipe import apply_recipe

    loaded = load_hf(src, dtype=getattr(jnp, dtype))
    res = apply_recipe(loaded.model, cfg, warn=False)
    n = 0
    for s in quantizer_sites(loaded.model):
        cfg = s.quantizer.config if s.quantizer.enabled else None
        if cfg is not None and not cfg.is_dynamic and cfg.fixed_amax is None:  # dynamic / constant: no calibrated amax
            q, name = s.quantizer, s.names[0]
            if name not in amax and f"{name}.0" in amax:  # a SequentialQuantizer: INT4 blocks (0), then FP8 (1)
                q.global_amax.value = jnp.asarray(amax[f"{name}.1"], jnp.float32).reshape(q.global_amax.value.shape)
                name += ".0"
            q.amax.value = jnp.asarray(amax[name], jnp.float32).reshape(q.amax.value.shape)
            if q.bias is not None:  # ModelOpt's [1, heads, 1, D] -> jaxquant's [1, 1, heads, D]
                q.bias.value = jnp.asarray(biases[name].transpose(0, 2, 1, 3), jnp.float32)
            n += 1
    assert n == n_enabled, n
    export_hf(loaded, out, resolution=res)


def assert_same_export(mo: Path, jq: Path) -> dict:
    """Every tensor byte-identical, ``hf_quant_config.json`` and ``config.json`` equal but for the producer;
    returns ModelOpt's tensors (``tensors_of``)."""
    ref, ours = tensors_of(mo), tensors_of(jq)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k] == ref[k], k
    for f in ("hf_quant_config.json", "config.json"):
        a, b = json_of(mo / f), json_of(jq / f)
        assert (b.get("quantization_config") or b).pop("producer")["name"] == "jaxquant"
        (a.get("quantization_config") or a).pop("producer")
        assert a == b, f
    return ref


def compare_exports(tmp: Path, cfg: dict, dtype: str, n_enabled: int, make=None, with_biases: bool = False) -> dict:
    """Build a tiny Llama (``make(path, dtype)``, default ``make_llama`` untied), quantize and export it with
    ModelOpt (``tmp/mo``) and with jaxquant from ModelOpt's amax (``tmp/jq``), assert the two are the same
    (``assert_same_export``); returns ModelOpt's tensors."""
    src = tmp / "src"
    model = make(src, dtype) if make is not None else make_llama(src, tie=False, dtype=dtype)
    amax = modelopt_quantize(model, cfg)
    biases = modelopt_biases(model) if with_biases else None
    modelopt_export(model, tmp / "mo", dtype)
    export_recipe_like_modelopt(src, cfg, amax, dtype, tmp / "jq", n_enabled=n_enabled, biases=biases)
    return assert_same_export(tmp / "mo", tmp / "jq")
