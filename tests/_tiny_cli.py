"""A tiny Llama checkpoint (config.json, model.safetensors, a word-level fast tokenizer) and text files for
command-line tests: no torch, no assets, seconds to write."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.converters.names import hf_param_names
from jaxquant.io.safetensors import save_file
from jaxquant.models import ModelConfig, build_model

WORDS = ("the a of to in and is was for on with as by at from that it this be are were has had not but or an "
         "river city music history people year war king north south church school team game film book light "
         "water stone bridge market garden island ship road village castle station library theatre").split()


def _text(seed: int, n_docs: int, words_per_doc: int) -> str:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(words_per_doc // 2, words_per_doc))
        docs.append(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)) + ".")
    return "\n\n".join(docs) + "\n"


def write_tiny_checkpoint(d: Path, *, max_pos: int = 128, nan: bool = False, arch: str = "LlamaForCausalLM") -> Path:
    """A tiny Llama checkpoint directory: config.json, model.safetensors, a word-level fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ".": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)
    hf = {"architectures": [arch], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": max_pos, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
          "rms_norm_eps": 1e-5, "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(hf))
    if arch == "LlamaForCausalLM":
        model = build_model(ModelConfig.from_hf_config(hf), dtype=jnp.float32, rngs=nnx.Rngs(0))
        names = hf_param_names(model)
        tensors = {names[".".join(str(p) for p in path)]: np.asarray(v.get_value())
                   for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        if nan:
            k = "model.layers.1.mlp.up_proj.weight"
            tensors[k] = tensors[k].copy()
            tensors[k][0, 0] = np.nan
        save_file(tensors, d / "model.safetensors")
    return d


def cli_files(root: Path) -> dict:
    """``{"root", "model", "calib", "eval"}``: a tiny checkpoint plus calibration and evaluation text under ``root``."""
    ckpt = write_tiny_checkpoint(root / "tiny")
    calib = root / "calib.txt"
    calib.write_text(_text(0, 40, 30))
    ev = root / "eval.txt"
    ev.write_text(_text(1, 60, 60))
    return {"root": str(root), "model": str(ckpt), "calib": str(calib), "eval": str(ev)}
