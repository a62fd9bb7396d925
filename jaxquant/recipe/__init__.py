"""ModelOpt YAML recipes and the quantizer-name matcher.

* ``load_recipe(name_or_path)`` reads a ModelOpt PTQ recipe (list form, legacy dict form,
  ``imports`` / ``$import``) into a validated ``Recipe``; ``recipe_from_dict`` takes the dict
  configs ModelOpt users pass to ``mtq.quantize``; ``preset_recipe(qformat, kv_cache_qformat)``
  builds hf_ptq's ``--qformat`` / ``--kv_cache_qformat`` configs.
* ``resolve(recipe, sites)`` gives every quantizer name its final config with ModelOpt's
  ``set_quantizer_by_cfg`` semantics; ``resolve_pytree`` does it for any JAX parameter pytree;
  ``apply_recipe(model, recipe)`` configures the ``TensorQuantizer``s of an NNX model.

See docs/recipes.md.
"""

from jaxquant.recipe.apply import apply_recipe, default_name_map, find_quantizers
from jaxquant.recipe.loader import (
    builtin_root,
    list_recipes,
    load_config,
    load_recipe,
    resolve_recipe_path,
)
from jaxquant.recipe.matcher import (
    QuantizerSite,
    Resolution,
    RuleRef,
    UnmatchedRuleWarning,
    fused_expert_name,
    normalize_quantizer_name,
    resolve,
    resolve_pytree,
    sites_from_pytree,
)
from jaxquant.recipe.presets import kv_cache_qformat_choices, preset_recipe, qformat_choices
from jaxquant.recipe.recipe import (
    supported_algorithm_names,
    QuantCfgEntry,
    Recipe,
    RecipeMetadata,
    normalize_quant_cfg,
    recipe_from_dict,
)

__all__ = [
    "QuantCfgEntry",
    "QuantizerSite",
    "Recipe",
    "RecipeMetadata",
    "Resolution",
    "RuleRef",
    "supported_algorithm_names",
    "UnmatchedRuleWarning",
    "apply_recipe",
    "builtin_root",
    "default_name_map",
    "find_quantizers",
    "kv_cache_qformat_choices",
    "list_recipes",
    "load_config",
    "load_recipe",
    "normalize_quant_cfg",
    "fused_expert_name",
    "normalize_quantizer_name",
    "preset_recipe",
    "qformat_choices",
    "recipe_from_dict",
    "resolve",
    "resolve_pytree",
    "resolve_recipe_path",
    "sites_from_pytree",
]
