"""Calibration and evaluation text: built-in offline corpora, local files, hf_ptq's hub datasets, and hf_ptq's
batch formation. See docs/data.md."""

from jaxquant.data.batching import (
    CalibBatches,
    build_calib_batches,
    calib_batches,
    check_token_ids,
    config_token_ids,
    eos_token_id,
    make_batches,
    pack_rows,
    pad_token_id,
    tokenize_padded,
)
from jaxquant.data.builtin import (
    BUILTIN_DATASETS,
    DEFAULT_CALIB_DATASET,
    DEFAULT_EVAL_DATASET,
    DEFAULT_EVAL_SPLIT,
    builtin_texts,
)
from jaxquant.data.hub import HUB_COMBOS, HUB_DATASETS, hub_unreachable_reason
from jaxquant.data.sources import (
    expand_datasets,
    load_eval_text,
    load_texts,
    match_calib_sizes,
    parse_calib_sizes,
    parse_dataset_spec,
)

__all__ = [
    "BUILTIN_DATASETS",
    "CalibBatches",
    "DEFAULT_CALIB_DATASET",
    "DEFAULT_EVAL_DATASET",
    "DEFAULT_EVAL_SPLIT",
    "HUB_COMBOS",
    "HUB_DATASETS",
    "build_calib_batches",
    "builtin_texts",
    "calib_batches",
    "check_token_ids",
    "config_token_ids",
    "eos_token_id",
    "expand_datasets",
    "hub_unreachable_reason",
    "load_eval_text",
    "load_texts",
    "make_batches",
    "match_calib_sizes",
    "pack_rows",
    "pad_token_id",
    "parse_calib_sizes",
    "parse_dataset_spec",
    "tokenize_padded",
]
