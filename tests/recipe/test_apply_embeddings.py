"""A recipe that ModelOpt would apply to the token embedding (no ``parent_class: nn.Embedding`` exclusion) warns:
jaxquant's embeddings hold no quantizer, so the embedding stays unquantized, and the user is told."""

import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_families import write_tiny_family  # noqa: E402

from jaxquant.recipe import apply_recipe  # noqa: E402
from jaxquant.recipe.apply import EmbeddingNotQuantizedWarning  # noqa: E402

FP8 = {"num_bits": (4, 3), "axis": None}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from jaxquant.converters import load_hf

    return load_hf(write_tiny_family("llama", tmp_path_factory.mktemp("llama") / "ck"), dtype=jnp.float32)


def test_an_enabled_embedding_rule_warns_and_an_exclusion_silences_it(tiny_llama):
    bare = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": FP8}]}
    with pytest.warns(EmbeddingNotQuantizedWarning, match=r"model\.embed_tokens\.weight_quantizer \(fp8\)"):
        res = apply_recipe(tiny_llama.model, bare)
    assert not any("embed_tokens" in n for n in res.configs)  # no such quantizer: nothing configured there
    excluded = {"quant_cfg": bare["quant_cfg"] + [{"quantizer_name": "*", "parent_class": "nn.Embedding",
                                                   "enable": False}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingNotQuantizedWarning)
        apply_recipe(tiny_llama.model, excluded)
        apply_recipe(tiny_llama.model, "general/ptq/fp8_default-kv_fp8")  # ModelOpt's recipes exclude it
