"""ModelOpt as the oracle for recipe resolution: tiny HF torch models converted by ModelOpt."""

import copy
import re
import warnings

# parent_class names the shipped recipes use; a torch quantizer's site lists those its parent is.
PARENT_KEYS = ("nn.Linear", "nn.Embedding", "nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d",
               "nn.LeakyReLU")


def _tiny_models():
    import transformers as tf

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, head_dim=8)
    return {
        "llama": tf.LlamaForCausalLM(tf.LlamaConfig(**common)),
        "mixtral": tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=4,
                                                          num_experts_per_tok=2)),
        "qwen3_moe": tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            decoder_sparse_step=1)),
        "qwen2_moe": tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, decoder_sparse_step=1)),
    }


class TorchOracle:
    """A ModelOpt-converted torch model: apply a quant_cfg with ModelOpt, read back every
    quantizer's attributes, and list the matching ``QuantizerSite``s for jaxquant."""

    def __init__(self, name, model):
        from modelopt.torch.quantization.nn import TensorQuantizer

        self.name = name
        self.model = model
        self._tq = TensorQuantizer

    def _quantizers(self, model):
        from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
            HardDisabledTensorQuantizer,
        )

        for n, m in model.named_modules():
            if isinstance(m, self._tq) and not isinstance(m, HardDisabledTensorQuantizer):
                yield n, m

    def sites(self):
        from modelopt.torch.quantization.nn import QuantModuleRegistry

        from jaxquant.recipe import QuantizerSite

        out = []
        for n, _ in self._quantizers(self.model):
            parent = self.model.get_submodule(n.rpartition(".")[0])
            classes = tuple(k for k in PARENT_KEYS
                            if k in QuantModuleRegistry and isinstance(parent, QuantModuleRegistry[k]))
            out.append(QuantizerSite(n, classes or type(parent).__name__))
        return out

    def apply(self, quant_cfg):
        """ModelOpt's ``set_quantizer_by_cfg`` on a fresh copy -> {name: attrs or None}."""
        from modelopt.torch.quantization.conversion import set_quantizer_by_cfg

        model = copy.deepcopy(self.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_quantizer_by_cfg(model, quant_cfg)
        out = {}
        for n, q in self._quantizers(model):
            out[n] = torch_attrs(q) if q.is_enabled else None
        return out


def _norm_block(bs):
    if bs is None:
        return None
    d = dict(bs)
    d.setdefault("type", "static")
    return d


def torch_attrs(q):
    """The attributes compared between ModelOpt's TensorQuantizer and our resolved config."""
    return {
        "num_bits": q.num_bits,
        "axis": q.axis,
        "block_sizes": _norm_block(q.block_sizes),
        "use_constant_amax": bool(getattr(q, "_use_constant_amax", False)),
        "constant_amax": getattr(q, "_constant_amax", None),
        "dynamic": bool(getattr(q, "_dynamic", False)),
        "bias": dict(q.bias) if getattr(q, "bias", None) else None,
    }


def our_attrs(cfg):
    if cfg is None:
        return None
    return {
        "num_bits": cfg.num_bits,
        "axis": cfg.axis,
        "block_sizes": _norm_block(cfg.block_sizes.to_dict()) if cfg.block_sizes else None,
        "use_constant_amax": cfg.use_constant_amax,
        "constant_amax": cfg.constant_amax,
        "dynamic": cfg.type == "dynamic",
        "bias": dict(cfg.bias) if cfg.bias else None,
    }


def ours_with_chains(configs):
    """Our resolved configs as attributes; a chain as the tuple of its parts' attributes."""
    return {n: tuple(our_attrs(p) for p in c) if isinstance(c, tuple) else our_attrs(c) for n, c in configs.items()}


def collapse_sequential(expected):
    """ModelOpt's ``q.0``, ``q.1`` (the parts of a SequentialQuantizer) as one entry ``q``: the parts' attributes,
    or None when every part is disabled."""
    out, parts = {}, {}
    for name, attrs in expected.items():
        base, _, i = name.rpartition(".")
        if i.isdigit() and re.search(r"_quantizer$|_quantizers\.\d+$", base):
            parts.setdefault(base, []).append(attrs)
        else:
            out[name] = attrs
    for base, ps in parts.items():
        out[base] = None if all(p is None for p in ps) else tuple(ps)
    return out
