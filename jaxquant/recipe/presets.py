"""hf_ptq's ``--qformat`` / ``--kv_cache_qformat`` vocabulary as recipes.

ModelOpt's ``examples/hf_ptq/hf_ptq.py`` (spec modelopt.md §4) builds its config from two presets:
``configs/ptq/presets/model/<qformat>.yaml`` (a full ``QuantizeConfig``) and, unless the KV format is
``none``, ``configs/ptq/presets/kv/<kv_cache_qformat>.yaml`` whose entries are **appended**
(``mtq.update_quant_cfg_with_kv_cache_quant``; the algorithm becomes ``max`` when the preset has
none; without a KV preset a preset's null algorithm stays null: no calibration). ``preset_recipe`` does the same with jaxquant's copies of those presets; hf_ptq's defaults
are ``fp8`` and ``fp8_cast``.
"""

from __future__ import annotations

import dataclasses

from jaxquant.errors import RecipeError, UnsupportedError
from jaxquant.recipe.loader import builtin_root, load_config
from jaxquant.recipe.recipe import (
    Recipe,
    RecipeMetadata,
    child_where,
    normalize_quant_cfg,
    parse_quantize,
)

MODEL_PRESET_DIR = "configs/ptq/presets/model"
KV_PRESET_DIR = "configs/ptq/presets/kv"
KV_CACHE_NONE = "none"
DEFAULT_QFORMAT = "fp8"
DEFAULT_KV_CACHE_QFORMAT = "fp8_cast"

# ModelOpt 0.47 presets jaxquant does not ship (their formats / algorithms are not implemented).
MODELOPT_QFORMATS = (
    "fp8", "fp8_2d_blockwise_weight_only", "fp8_per_channel_per_token", "int4_awq",
    "int4_blockwise_weight_only", "int8", "int8_smoothquant", "int8_weight_only",
    "mamba_moe_fp8_aggressive", "mamba_moe_fp8_conservative", "mamba_moe_nvfp4_aggressive",
    "mamba_moe_nvfp4_conservative", "mxfp4", "mxfp4_mlp_weight_only", "mxfp6", "mxfp8", "mxint8",
    "nvfp4", "nvfp4_awq_clip", "nvfp4_awq_full", "nvfp4_awq_lite", "nvfp4_experts_only",
    "nvfp4_four_over_six", "nvfp4_fp8_mha", "nvfp4_mlp_only", "nvfp4_mlp_weight_only",
    "nvfp4_omlp_only", "nvfp4_svdquant", "nvfp4_w4a4_weight_local_hessian",
    "nvfp4_w4a4_weight_mse_fp8_sweep", "w4a16_nvfp4", "w4a8_awq_beta", "w4a8_mxfp4_fp8",
    "w4a8_nvfp4_fp8",
)
#: What each ModelOpt preset jaxquant does not ship yet is missing (named in the error a user gets).
PENDING_QFORMATS: dict[str, str] = {}
#: What each ModelOpt KV preset jaxquant does not ship yet is missing.
PENDING_KV_QFORMATS = {
}
MODELOPT_KV_QFORMATS = ("fp8", "fp8_affine", "fp8_cast", "nvfp4", "nvfp4_affine", "nvfp4_cast",
                        "nvfp4_rotate")


def _names(subdir: str) -> tuple[str, ...]:
    d = builtin_root() / subdir
    return tuple(sorted(p.stem for p in d.glob("*.yaml")))


def qformat_choices() -> tuple[str, ...]:
    """The ``--qformat`` names jaxquant ships (a subset of ModelOpt's)."""
    return _names(MODEL_PRESET_DIR)


def kv_cache_qformat_choices() -> tuple[str, ...]:
    """The ``--kv_cache_qformat`` names jaxquant ships, plus ``none``."""
    return (KV_CACHE_NONE, *_names(KV_PRESET_DIR))


def preset_recipe(qformat: str = DEFAULT_QFORMAT,
                  kv_cache_qformat: str = DEFAULT_KV_CACHE_QFORMAT) -> Recipe:
    """The recipe hf_ptq builds from ``--qformat`` and ``--kv_cache_qformat``.

    Args:
      qformat: a model preset name (``fp8``, ``nvfp4``, ``nvfp4_mlp_only``, ...).
      kv_cache_qformat: a KV preset name (``fp8``, ``fp8_cast``, ``fp8_affine``, ``nvfp4``, ``nvfp4_cast``,
        ``nvfp4_affine``) or ``none``.

    Raises:
      UnsupportedError: a ModelOpt preset whose format jaxquant does not implement yet.
      RecipeError: an unknown name.
    """
    models, kvs = qformat_choices(), kv_cache_qformat_choices()
    if qformat not in models:
        if qformat in MODELOPT_QFORMATS:
            needs = PENDING_QFORMATS.get(qformat)
            why = f": it needs {needs}, which jaxquant does not implement yet" if needs else ""
            raise UnsupportedError(
                f"--qformat {qformat!r} is not supported yet{why}; supported: {', '.join(models)}"
            )
        raise RecipeError(f"unknown --qformat {qformat!r}; choices: {', '.join(models)}")
    if kv_cache_qformat not in kvs:
        if kv_cache_qformat in MODELOPT_KV_QFORMATS:
            needs = PENDING_KV_QFORMATS.get(kv_cache_qformat)
            why = f": it needs {needs}, which jaxquant does not implement yet" if needs else ""
            raise UnsupportedError(
                f"--kv_cache_qformat {kv_cache_qformat!r} is not supported yet{why}; supported: "
                f"{', '.join(kvs)}"
            )
        raise RecipeError(
            f"unknown --kv_cache_qformat {kv_cache_qformat!r}; choices: {', '.join(kvs)}"
        )
    model_path = f"{MODEL_PRESET_DIR}/{qformat}"
    data = load_config(model_path)
    base = parse_quantize(data, getattr(data, "where", None) or f"{model_path}: ",
                          source=str(builtin_root() / f"{model_path}.yaml"))
    entries = base.quant_cfg or normalize_quant_cfg([{"quantizer_name": "*", "enable": False}])
    if kv_cache_qformat != KV_CACHE_NONE:
        kv_path = f"{KV_PRESET_DIR}/{kv_cache_qformat}"
        kv = load_config(kv_path)
        where = getattr(kv, "where", None) or f"{kv_path}: "
        if "quant_cfg" not in kv:
            raise RecipeError(f"{kv_path}: a KV preset needs quant_cfg")
        entries = entries + normalize_quant_cfg(kv["quant_cfg"], child_where(where, "quant_cfg"))
    # ModelOpt: a preset without an algorithm (mxfp8: nothing to calibrate) keeps None unless a KV preset is
    # appended, which makes it max (``update_quant_cfg_with_kv_cache_quant``)
    algorithm = base.algorithm if kv_cache_qformat == KV_CACHE_NONE else (base.algorithm or "max")
    recipe = dataclasses.replace(
        base,
        metadata=RecipeMetadata(
            recipe_type="ptq",
            description=f"hf_ptq --qformat {qformat} --kv_cache_qformat {kv_cache_qformat}",
        ),
        quant_cfg=entries,
        algorithm=algorithm,
        source=f"--qformat {qformat} --kv_cache_qformat {kv_cache_qformat}",
    )
    return recipe.check_supported()
