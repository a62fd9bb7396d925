"""Partition rules per model family: how each parameter is laid out over a ``jax.sharding.Mesh`` (pure data).

A family's ``FamilySpec.partition_rules`` (``models/config.py``, next to its HF name map) is a tuple of
``(pattern, spec)`` pairs. ``pattern`` is a regular expression matched in full against the parameter's NNX path
(the HF name after the family's text prefix: ``model.layers.3.self_attn.q_proj.weight``); the first match wins.
``spec`` names, per dimension of the tensor, the mesh axes it is split over: ``None`` (not split), an axis name,
or a tuple of axis names (split over their product, the first one outermost). Parameters no rule matches are
replicated; so is every tensor one of whose dimensions is not divisible by the product of its axes
(``jaxquant.mesh.param_spec``).

The axes (``jaxquant.mesh.AXES``):

* ``fsdp``: every large weight's rows (its first dimension: a linear's output features ``[out, in]``, the
  vocabulary of the embeddings; the experts' ``[E, out, in]`` output rows) are split over ``fsdp``, so each
  device stores 1/fsdp of the model; each calibration stage gathers its layer's weights where they are used.
* ``tensor``: the attention heads (q/k/v's output rows), the MLP's intermediate features (gate/up rows, and
  down's rows too, see below) and the MoE experts are split over ``tensor``.
* ``data``: no parameter is split over it; the calibration batches are (``jaxquant.mesh.batch_sharding``).

``o_proj`` and ``down_proj`` are split by their *output* rows like every other linear, not by their input
features as Megatron's row-parallel layers are: splitting the input features splits the contraction, whose
partial sums are then added across devices in another order than one device adds them, which changes the
activations in the last bit and with them the calibrated amax. Splitting rows keeps every contraction whole on one
device. Inside each calibration stage the weights are gathered over ``fsdp`` (``jaxquant.mesh.compute_shardings``),
so with ``fsdp`` and ``data`` alone a sharded calibration gives the single-device statistics bit for bit; a ``tensor``
split leaves each device a narrower matmul, which XLA may round differently in the last bit (docs/scale.md).

Norm weights, biases of the output projections, routers and other small vectors are replicated: they are a
negligible share of the model, and splitting them would make XLA split the normalisation's reductions.
"""

from __future__ import annotations

FSDP = "fsdp"
TENSOR = "tensor"
_ROWS = (TENSOR, FSDP)  # heads / intermediate features over tensor, then rows over fsdp

#: The llama-like decoder (Llama, Mistral, Qwen 2/3, Gemma 3/4 dense layers): attention and gated MLP.
DECODER_RULES: tuple[tuple[str, tuple], ...] = (
    (r"model\.embed_tokens\.weight", (FSDP, None)),
    (r"lm_head\.weight", (_ROWS, None)),
    (r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.weight", (_ROWS, None)),
    (r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias", (_ROWS,)),
    (r"model\.layers\.\d+\.self_attn\.o_proj\.weight", (_ROWS, None)),
    (r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", (_ROWS, None)),
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.bias", (_ROWS,)),
)

#: Stacked MoE experts ``[E, out, in]`` (Mixtral's ``block_sparse_moe.experts``, Qwen3-MoE's ``mlp.experts``,
#: Gemma 4's ``experts``): experts over ``tensor``, their rows over ``fsdp``; dense shared MLPs as the decoder's.
MOE_RULES: tuple[tuple[str, tuple], ...] = (
    (r"model\.layers\.\d+\.(.+\.)?experts\.(gate|up|down)_proj", (TENSOR, FSDP, None)),
) + DECODER_RULES

__all__ = ["DECODER_RULES", "FSDP", "MOE_RULES", "TENSOR"]
