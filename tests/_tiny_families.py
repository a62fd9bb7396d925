"""Tiny random checkpoints of every family jaxquant supports, written the way users get them: by transformers'
``save_pretrained(safe_serialization=True)``, with a byte-level tokenizer that has **no special tokens** (no BOS,
EOS, PAD or UNK) and ``max_position_embeddings`` 512. Test-only (needs torch + transformers + tokenizers).

Every family has 2 layers and dimensions that are multiples of 16 (NVFP4 blocks run along input features), the
vocabulary (272) covers the tokenizer's 256 byte tokens, and every parameter is perturbed so no norm is trivial.
``config.json`` names ``eos_token_id`` 10 (``"\\n"``) everywhere, ``pad_token_id`` 0 on some families and None on
the others (``PAD_IN_CONFIG``), ``bos_token_id`` 2 on some families and None on the others (``BOS_IN_CONFIG``),
while the tokenizer itself names none of them. Where the config's BOS is prepended to perplexity windows, the
default 512-token window must be clamped to 511.

Import it from a test module (pytest's rootless "prepend" import mode puts only the test file's own folder on
sys.path, so add tests/ first)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
    from _tiny_families import FAMILIES, write_tiny_family
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MAX_POS = 512
VOCAB = 272  # >= the tokenizer's 256 byte tokens; a multiple of 16
EOS_ID = 10  # "\n" in the byte vocabulary (id == byte value)
PAD_ID = 0
BOS_ID = 2  # "\x02"

_DENSE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # noqa: C408
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS, bos_token_id=None,
              eos_token_id=EOS_ID, tie_word_embeddings=False)

# the Gemma-4-31B layout: sliding layer of 2 KV heads x 16, full layer of 1 KV head x 32 with attention_k_eq_v (no
# v_proj), proportional RoPE on the full layer; no PLE, no KV sharing
_GEMMA4 = dict(_DENSE, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
               attention_k_eq_v=True, layer_types=["sliding_attention", "full_attention"], sliding_window=128,
               final_logit_softcapping=30.0, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
               tie_word_embeddings=True,
               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 1000000.0}})

# family -> (transformers config class, model class, config kwargs). The pad and BOS ids of config.json alternate.
_SPECS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DENSE, pad_token_id=PAD_ID, bos_token_id=BOS_ID)),
    # a window shorter than the 512-token eval window, so the sliding path is exercised
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DENSE, pad_token_id=None, sliding_window=128)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DENSE, pad_token_id=PAD_ID, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DENSE, pad_token_id=None, bos_token_id=BOS_ID, head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_DENSE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=128, layer_types=["sliding_attention", "full_attention"],
                    final_logit_softcapping=30.0, tie_word_embeddings=True)),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(_GEMMA4, pad_token_id=None)),
    # the Gemma-4-26B-A4B layout: a dense MLP plus router + experts in every layer
    "gemma4_moe": ("Gemma4TextConfig", "Gemma4ForCausalLM",
                   dict(_GEMMA4, pad_token_id=PAD_ID, bos_token_id=BOS_ID, intermediate_size=64,
                        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_DENSE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, intermediate_size=48, num_local_experts=4,
                     num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_DENSE, pad_token_id=None, intermediate_size=96, moe_intermediate_size=32, head_dim=16,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                       mlp_only_layers=[])),
}

FAMILIES: tuple[str, ...] = tuple(_SPECS)
"""Every family jaxquant supports (docs/models.md), one CausalLM checkpoint each, plus Gemma 4's MoE layout."""

ARCHITECTURES: dict[str, str] = {f: spec[1] for f, spec in _SPECS.items()}
PAD_IN_CONFIG: dict[str, int | None] = {f: spec[2]["pad_token_id"] for f, spec in _SPECS.items()}
BOS_IN_CONFIG: dict[str, int | None] = {f: spec[2]["bos_token_id"] for f, spec in _SPECS.items()}


def byte_level_tokenizer():
    """A ``PreTrainedTokenizerFast``: ByteLevel pre-tokenizer and decoder, a BPE over the 256 byte tokens (id ==
    byte value) with no merges, and no special tokens at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of ``pre_tokenizers.ByteLevel``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tiny_family(family: str, directory: str | os.PathLike, *, seed: int = 0, noise: float = 0.2) -> Path:
    """Write ``family``'s tiny random checkpoint (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json) into ``directory`` and return it."""
    import torch
    import transformers

    cfg_name, model_name, kwargs = _SPECS[family]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**kwargs)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):  # Gemma 4's per-layer output scale
                b.copy_(0.5 + torch.rand_like(b))
    model.save_pretrained(d, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(d)
    # transformers 5 overrides the saved tokenizer class for some model types (qwen2 -> Qwen2Tokenizer, whose
    # defaults add "<|endoftext|>" as EOS/PAD/UNK); explicit nulls keep every family's tokenizer special-free.
    tc = d / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), **{k: None for k in _SPECIAL_KEYS}}, indent=2) + "\n")
    _check_written(d, family)
    return d


_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _check_written(d: Path, family: str) -> None:
    """The checkpoint is what the tests claim: max_position_embeddings 512 and a tokenizer without specials, as
    ``AutoTokenizer`` (what jaxquant uses) loads it."""
    from transformers import AutoTokenizer

    cfg = json.loads((d / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert text["max_position_embeddings"] == MAX_POS, (family, text.get("max_position_embeddings"))
    assert cfg["architectures"] == [ARCHITECTURES[family]], cfg["architectures"]
    for key, want in (("bos_token_id", BOS_IN_CONFIG[family]), ("pad_token_id", PAD_IN_CONFIG[family]),
                      ("eos_token_id", EOS_ID)):
        assert text.get(key) == want, (family, key, text.get(key))
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    for key in _SPECIAL_KEYS:
        assert tok_cfg.get(key) is None, (family, key, tok_cfg.get(key))
    tok = json.loads((d / "tokenizer.json").read_text())
    assert not tok.get("added_tokens"), tok.get("added_tokens")
    assert len(tok["model"]["vocab"]) == 256 and text["vocab_size"] >= 256
    loaded = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False, local_files_only=True)
    assert len(loaded) == 256 and not loaded.all_special_ids, (family, type(loaded).__name__, loaded.all_special_ids)
    assert loaded.decode(loaded("a\nb", add_special_tokens=False)["input_ids"]) == "a\nb"


__all__ = ["ARCHITECTURES", "BOS_ID", "BOS_IN_CONFIG", "EOS_ID", "FAMILIES", "MAX_POS", "PAD_IN_CONFIG", "VOCAB",
           "byte_level_tokenizer", "write_tiny_family"]
