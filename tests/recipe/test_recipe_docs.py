"""Issue 10: the recipe examples of docs/recipes.md load as written, and the mtq-style ``{algorithm, quant_cfg}`` YAML
is a recipe for the API (``load_recipe``) and the CLI (``jaxquant ptq --recipe``) alike."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _tiny_families import write_tiny_family  # noqa: E402

from jaxquant.errors import RecipeError  # noqa: E402
from jaxquant.recipe import apply_recipe, load_recipe, recipe_from_dict  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def _yaml_block_after(heading: str) -> str:
    """The first ```yaml block of docs/recipes.md after ``heading``, exactly as a reader copies it."""
    text = DOC.read_text()
    at = text.index(heading)
    m = re.compile(r"```yaml\n(.*?)```", re.S).search(text, at)
    assert m is not None, heading
    return m.group(1)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from jaxquant.converters import load_hf

    d = write_tiny_family("llama", tmp_path_factory.mktemp("llama") / "ck")
    return load_hf(d, dtype=jnp.float32)


def _cli_recipe(path: Path):
    """What `jaxquant ptq --recipe PATH` builds (the CLI's own function, on parsed arguments)."""
    from jaxquant.cli import build_parser
    from jaxquant.cli_ptq import _build_recipe

    args = build_parser().parse_args(["ptq", "--recipe", str(path)])
    return _build_recipe(args)[0]


def _fp8_weights(res) -> list[str]:
    return [n for n, c in res.configs.items() if c is not None and n.endswith("weight_quantizer")]


def test_legacy_example_loads_as_written(tmp_path, tiny_llama):
    p = tmp_path / "legacy.yaml"
    p.write_text(_yaml_block_after("### The legacy dict form"))
    assert "ptq_cfg" in yaml.safe_load(p.read_text())
    for recipe in (load_recipe(p), _cli_recipe(p)):
        assert recipe.algorithm == "max"
        assert [e.quantizer_name for e in recipe.quant_cfg][0] == "*"  # default hoisted to the front
        res = apply_recipe(tiny_llama.model, recipe, warn=False)
        weights = _fp8_weights(res)
        assert len(weights) >= 2 * 7  # q k v o gate up down of both layers (+ lm_head: '*weight_quantizer')
        assert "model.layers.1.self_attn.q_proj.weight_quantizer" in weights
        assert all(res.configs[n].num_bits == (4, 3) for n in weights)
        assert not any(n.endswith("input_quantizer") and c is not None for n, c in res.configs.items())


def test_mtq_style_example_is_a_recipe_for_api_and_cli(tmp_path, tiny_llama):
    text = _yaml_block_after("### The mtq-style config")
    raw = yaml.safe_load(text)
    assert set(raw) == {"algorithm", "quant_cfg"}  # no quantize: wrapper, no metadata
    p = tmp_path / "mtq.yaml"
    p.write_text(text)
    api, cli, mem = load_recipe(p), _cli_recipe(p), recipe_from_dict(raw)
    assert api.quant_cfg == cli.quant_cfg == mem.quant_cfg and api.algorithm == cli.algorithm == "max"
    res = apply_recipe(tiny_llama.model, cli, warn=False)
    assert len(_fp8_weights(res)) >= 14
    assert any(n.endswith("input_quantizer") and c is not None for n, c in res.configs.items())


def test_mtq_style_with_imports_and_legacy_dict(tmp_path):
    p = tmp_path / "mtq_imports.yaml"
    p.write_text("imports:\n  fp8: configs/numerics/fp8\n"
                 "algorithm: max\n"
                 "quant_cfg:\n"
                 "  - {quantizer_name: '*', enable: false}\n"
                 "  - {quantizer_name: '*weight_quantizer', cfg: {$import: fp8}}\n")
    r = load_recipe(p)
    assert r.quant_cfg[1].cfg.num_bits == (4, 3)
    q = tmp_path / "mtq_legacy.yaml"
    q.write_text("quant_cfg:\n  '*weight_quantizer': {num_bits: e4m3, axis: }\n  default: {enable: false}\n")
    assert load_recipe(q).quant_cfg[0].quantizer_name == "*"


def test_wrapped_recipe_without_metadata_still_names_it(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("quantize:\n  quant_cfg: []\n")
    with pytest.raises(RecipeError, match="missing 'metadata'"):
        load_recipe(p)
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: max\nquant_cfg:\n  - {quantizer_name: '*', enable: false}\nextra: 1\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: extra: unknown key"):
        load_recipe(bad)

