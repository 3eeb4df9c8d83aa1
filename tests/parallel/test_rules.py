"""The logical-axis rules table: it covers every name the models use, resolves to the intended mesh
axes, falls back to replicated on non-divisible dimensions, and activates in a context."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fpsa_jax.model.umt5 import UMT5Config, UMT5Encoder
from fpsa_jax.model.wan import param_logical_axes
from fpsa_jax.parallel import (
    LOGICAL_AXIS_RULES,
    check_rules_cover,
    logical_sharding,
    logical_to_mesh_sharding,
    make_mesh,
    shard_params,
    unmapped_logical_names,
    use_sharding,
)
from tests.conftest import TINY_WAN

AXES = ("data", "fsdp", "seq")
MESH_2X2X2 = AbstractMesh((2, 2, 2), AXES, axis_types=(AxisType.Auto,) * 3)
WAN = TINY_WAN.replace(dim=48, ffn_dim=64, num_heads=4, text_len=512, dtype="bfloat16")
UMT5 = UMT5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2)


def _umt5_logical_axes():
    ids = jnp.zeros((1, 2), jnp.int32)
    abstract = jax.eval_shape(UMT5Encoder(UMT5).init, jax.random.key(0), ids, ids)
    return nn.get_partition_spec(abstract["params"])


def _names(tree):
    return {n for spec in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P)) for n in spec}


@pytest.mark.parametrize("model", ["wan", "umt5"])
def test_rules_map_every_logical_name_of_the_model_params(model):
    specs = param_logical_axes(WAN) if model == "wan" else _umt5_logical_axes()
    assert _names(specs) - {None}  # the walk found names at all
    assert unmapped_logical_names(specs) == set()
    check_rules_cover(specs)


def test_rules_also_map_every_activation_name():
    # The names of the models' nn.with_logical_constraint calls.
    activations = P("batch", "length", "embed", "heads", "kv", "mlp")
    assert unmapped_logical_names(activations) == set()


def test_an_unmapped_name_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"\['experts'\] have no rule"):
        check_rules_cover({"w": P("embed", "experts")})


def test_activations_split_batch_over_data_and_fsdp_and_tokens_over_seq():
    got = logical_sharding(("batch", "length", "embed"), MESH_2X2X2)
    assert got.spec == P(("data", "fsdp"), "seq", None)  # 'embed' finds fsdp taken by batch


def test_params_are_fsdp_over_embed_and_whole_over_layers_heads_mlp():
    specs = param_logical_axes(WAN)
    shardings = logical_to_mesh_sharding(specs, MESH_2X2X2)
    blocks = shardings["blocks"]
    assert blocks["self_attn"]["q"]["kernel"].spec == P(None, "fsdp", None)
    assert blocks["self_attn"]["o"]["kernel"].spec == P(None, None, "fsdp")
    assert blocks["ffn"]["fc1"]["kernel"].spec == P(None, "fsdp", None)
    assert blocks["self_attn"]["norm_q"]["scale"].spec == P(None, None)  # ('layers', 'heads')
    assert shardings["patch_embedding"]["kernel"].spec == P(None, "fsdp")
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))


def test_a_dimension_not_divisible_by_its_mesh_axes_falls_back_to_replicated():
    assert logical_sharding(("embed", "heads"), MESH_2X2X2, shape=(48, 8)).spec == P("fsdp", None)
    assert logical_sharding(("embed", "heads"), MESH_2X2X2, shape=(47, 8)).spec == P(None, None)
    # batch over data x fsdp = 4: 6 examples do not divide, so the batch is replicated.
    got = logical_sharding(("batch", "length"), MESH_2X2X2, shape=(6, 8))
    assert got.spec == P(None, "seq")


def test_mesh_axes_missing_from_the_mesh_are_dropped():
    mesh = AbstractMesh((2,), ("fsdp",), axis_types=(AxisType.Auto,))
    assert logical_sharding(("batch", "length"), mesh).spec == P("fsdp", None)


def test_shard_params_places_every_leaf_on_the_mesh():
    params = {"w": jnp.ones((4, 6)), "b": jnp.ones((6,))}
    specs = {"w": P("embed", "mlp"), "b": P("mlp")}
    mesh = make_mesh()
    out = shard_params(params, mesh, specs)
    assert out["w"].sharding == NamedSharding(mesh, P("fsdp", None))
    assert out["b"].sharding == NamedSharding(mesh, P(None))


def test_use_sharding_activates_mesh_and_rules_and_restores_them():
    mesh = make_mesh()
    assert jax.sharding.get_abstract_mesh().empty
    with use_sharding(mesh) as active:
        assert active is mesh
        assert nn.get_logical_axis_rules() == LOGICAL_AXIS_RULES
        assert dict(jax.sharding.get_abstract_mesh().shape) == dict(mesh.shape)
    assert jax.sharding.get_abstract_mesh().empty
    assert nn.get_logical_axis_rules() == ()
