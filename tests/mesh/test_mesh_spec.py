"""``--mesh`` parsing and the partition rules (``jaxquant.mesh``, ``models/partition.py``), without devices: the
sharded runs themselves are in ``test_mesh_sharded.py`` (8 virtual CPU devices, in a subprocess)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from jaxquant.cli import main
from jaxquant.converters.names import dotted
from jaxquant.mesh import AXES, MeshError, param_spec, parse_mesh_spec
from jaxquant.models import ARCHITECTURES, ModelConfig
from jaxquant.models.decoder import abstract_model
from jaxquant.models.partition import DECODER_RULES, MOE_RULES


def _mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), AXES)


def test_spec_parsing():
    assert parse_mesh_spec("tensor=2,fsdp=4", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert parse_mesh_spec(" data=2 , fsdp=4 ", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec("", 8) == {"data": 1, "fsdp": 8, "tensor": 1}  # --mesh alone: every device on fsdp
    assert parse_mesh_spec(None, 3) == {"data": 1, "fsdp": 3, "tensor": 1}
    assert parse_mesh_spec({"tensor": 8}, 8) == {"data": 1, "fsdp": 1, "tensor": 8}


@pytest.mark.parametrize("spec,words", [
    ("pipeline=8", ["unknown axis 'pipeline'", "data, fsdp, tensor"]),
    ("fsdp=4", ["fsdp=4 = 4 devices", "sees 8", "multiply to 8"]),
    ("tensor=2,fsdp=8", ["16 devices"]),
    ("fsdp", ["'fsdp' is not AXIS=N"]),
    ("fsdp=0,tensor=8", ["positive integer", "'0'"]),
    ("fsdp=two", ["positive integer", "'two'"]),
    ("fsdp=4,fsdp=2", ["given twice"]),
])
def test_spec_errors_name_the_problem(spec, words):
    with pytest.raises(MeshError) as e:
        parse_mesh_spec(spec, 8)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_cli_refuses_a_bad_mesh_before_loading(tmp_path, capsys):
    rc = main(["ptq", "--model", str(tmp_path / "absent"), "--mesh", "pipeline=2", "--eval-windows", "0"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "unknown axis 'pipeline'" in err and "no such file" not in err


def test_rules_rows_over_fsdp_heads_over_tensor():
    q = "model.layers.3.self_attn.q_proj.weight"
    assert param_spec(DECODER_RULES, q, (64, 64), _mesh(fsdp=8)) == PartitionSpec("fsdp", None)
    assert param_spec(DECODER_RULES, q, (64, 64), _mesh(fsdp=4, tensor=2)) == PartitionSpec(("tensor", "fsdp"), None)
    assert param_spec(DECODER_RULES, q, (64, 64), _mesh(data=8)) == PartitionSpec(None, None)  # data: batches only
    down = "model.layers.0.mlp.down_proj.weight"  # rows too: the contraction is never split
    assert param_spec(DECODER_RULES, down, (64, 128), _mesh(fsdp=4, tensor=2)) == PartitionSpec(("tensor", "fsdp"), None)
    experts = "model.layers.1.mlp.experts.gate_proj"
    assert param_spec(MOE_RULES, experts, (4, 32, 64), _mesh(fsdp=4, tensor=2)) == PartitionSpec("tensor", "fsdp", None)
    assert param_spec(MOE_RULES, "model.layers.1.block_sparse_moe.experts.down_proj", (4, 64, 48),
                      _mesh(fsdp=8)) == PartitionSpec(None, "fsdp", None)


def test_rules_fall_back_to_replication():
    m = _mesh(fsdp=8)
    assert param_spec(DECODER_RULES, "model.layers.0.self_attn.k_proj.weight", (36, 64), m) == PartitionSpec()
    assert param_spec(MOE_RULES, "model.layers.0.mlp.experts.up_proj", (3, 32, 64), _mesh(tensor=2, fsdp=4)) == \
        PartitionSpec()  # 3 experts over tensor=2: the whole tensor is replicated
    assert param_spec(DECODER_RULES, "model.norm.weight", (64,), m) == PartitionSpec()  # no rule
    assert param_spec(DECODER_RULES, "model.layers.0.self_attn.q_proj.weight", (64,), m) == PartitionSpec()  # rank


def test_every_family_has_rules_that_shard_its_linears():
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "tie_word_embeddings": False}
    model = abstract_model(ModelConfig.from_hf_config(hf), dtype=jnp.float32)
    rules = ARCHITECTURES["LlamaForCausalLM"].partition_rules
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        p, shape = dotted(path), var.get_value().shape
        spec = param_spec(rules, p, shape, _mesh(fsdp=8))
        assert (spec != PartitionSpec()) == (len(shape) == 2), (p, shape, spec)
    for arch, spec in ARCHITECTURES.items():
        assert spec.partition_rules, arch
        for pattern, dims in spec.partition_rules:
            re.compile(pattern)
            for axes in dims:
                names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
                assert set(names) <= {"fsdp", "tensor"}, (arch, pattern)
