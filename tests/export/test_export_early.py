"""The export started before the calibration forward (export/early.py) writes exactly what export_hf writes after it."""

import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

from jaxquant.calibration import quantize  # noqa: E402
from jaxquant.converters import load_hf  # noqa: E402
from jaxquant.export import EarlyExport, export_hf  # noqa: E402
from jaxquant.export.early import ExportCancelled  # noqa: E402
from jaxquant.recipe import load_recipe  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


def _files(d):
    return {p: (d / p).read_bytes() for p in sorted(os.listdir(d))}


def _mixtral(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**BASE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(str(tmp_path / "src"))
    return np.random.default_rng(0).integers(0, 96, (4, 16)).astype(np.int32)


@pytest.mark.parametrize("case", ["nvfp4", "nvfp4_sync_weights", "fp8_affine_kv"])
def test_early_export_same_bytes_as_export_after(tmp_path, case):
    from jaxquant.recipe import preset_recipe

    ids = _mixtral(tmp_path)
    # NVFP4 weights, NVFP4 inputs, FP8 KV: late input_scale / k_scale / v_scale in every layer; with
    # sync_expert_weight_amax, finalize raises the experts' weight amax after the early start, so those tensors
    # must be written again; affine KV adds calibrated k_bias / v_bias (late too)
    recipe = load_recipe("general/ptq/nvfp4_default-kv_fp8")
    if case == "nvfp4_sync_weights":
        recipe = recipe.with_entries((), algorithm={"method": "max", "sync_expert_weight_amax": True})
    elif case == "fp8_affine_kv":
        recipe = preset_recipe("fp8", "fp8_affine")
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    started = []

    def start():
        started.append(EarlyExport(loaded, tmp_path / "early", max_shard_size="40KB"))

    quantize(loaded.model, recipe, (ids, np.ones_like(ids)), batch_size=2, progress=False, on_weights_calibrated=start)
    assert len(started) == 1
    summary = started[0].finish()
    assert len(summary.files) > 1  # several shards: late tensors land in files opened long before
    export_hf(loaded, tmp_path / "after", max_shard_size="40KB")
    early, after = _files(tmp_path / "early"), _files(tmp_path / "after")
    assert list(early) == list(after)
    if case == "fp8_affine_kv":
        assert any(b"self_attn.k_proj.k_bias" in v for k, v in early.items() if k.endswith(".safetensors"))
    for name in after:
        assert early[name] == after[name], name


def test_early_export_rewrites_weights_whose_amax_changed(tmp_path):
    """The planned-early weight scales are stale when finalize changed a weight amax: counted here by comparing
    the two plans, so the byte test above can't pass by never exercising the rewrite."""
    from jaxquant.export.hf import plan_export
    from jaxquant.export.shards import same_inputs

    ids = _mixtral(tmp_path)
    recipe = load_recipe("general/ptq/nvfp4_default-kv_fp8").with_entries(
        (), algorithm={"method": "max", "sync_expert_weight_amax": True})
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    plans = []
    quantize(loaded.model, recipe, (ids, np.ones_like(ids)), batch_size=2, progress=False,
             on_weights_calibrated=lambda: plans.append(plan_export(loaded, tmp_path / "x", activations=False)))
    final = {e.name: e for e in plan_export(loaded, tmp_path / "x").entries}
    first = plans[0].entries
    late = [e.name for e in first if e.late]
    assert late and all(n.endswith(("input_scale", "k_scale", "v_scale")) for n in late)
    stale = [e.name for e in first if not e.late and not same_inputs(e, final[e.name])]
    assert any(".experts." in n and n.endswith("weight_scale_2") for n in stale)


def test_cancel_leaves_nothing(tmp_path):
    ids = _mixtral(tmp_path)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    started = []

    class Boom(Exception):
        pass

    def start():
        started.append(EarlyExport(loaded, tmp_path / "out"))
        raise Boom  # the calibration fails after the early start

    with pytest.raises(Boom):
        quantize(loaded.model, "general/ptq/fp8_default-kv_fp8", (ids, np.ones_like(ids)), batch_size=2,
                 progress=False, on_weights_calibrated=start)
    started[0].cancel()
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no target, no temporary directory
    with pytest.raises(ExportCancelled):
        started[0].finish()


def test_early_plan_survives_the_calibration_donating_its_statistics(tmp_path, monkeypatch):
    """On a GPU the calibration step donates (deletes) every quantizer amax array from call to call while the writer
    thread plans: the early export must plan from its own copies. Simulated here: the writer thread's plan waits
    until the model's arrays are deleted, and the model gets fresh copies back once the plan is done."""
    import threading

    from flax import nnx

    from jaxquant.export import early as early_mod
    from jaxquant.quantizer.tensor_quantizer import QuantAmax, QuantGlobalAmax

    ids = _mixtral(tmp_path)
    loaded = load_hf(tmp_path / "src", dtype=jnp.float32)
    deleted, planned = threading.Event(), threading.Event()
    plan = early_mod.plan_export

    def plan_after_the_deletion(*args, **kwargs):
        if threading.current_thread().name != "jaxquant-early-export":
            return plan(*args, **kwargs)
        deleted.wait()
        try:
            return plan(*args, **kwargs)
        finally:
            planned.set()

    monkeypatch.setattr(early_mod, "plan_export", plan_after_the_deletion)
    started = []

    def start():
        started.append(EarlyExport(loaded, tmp_path / "early"))
        held = [(var, var.get_value()) for _, var in nnx.to_flat_state(nnx.state(loaded.model,
                                                                                  (QuantAmax, QuantGlobalAmax)))]
        copies = [jnp.copy(a) for _, a in held]
        for _, a in held:
            a.delete()  # what a donating step does to the arrays the model still holds
        deleted.set()
        assert planned.wait(120)
        for (var, _), c in zip(held, copies):
            var.set_value(c)  # the step's write-back

    quantize(loaded.model, "general/ptq/nvfp4_default-kv_fp8", (ids, np.ones_like(ids)), batch_size=2,
             progress=False, on_weights_calibrated=start)
    started[0].finish()
    export_hf(loaded, tmp_path / "after")
    assert _files(tmp_path / "early") == _files(tmp_path / "after")
