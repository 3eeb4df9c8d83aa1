"""load_umt5 reads every supported form, and rejects everything else with a CheckpointError that
names the files, keys or shapes at fault."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from fpsa_jax.convert.errors import CheckpointError
from fpsa_jax.convert.umt5 import load_umt5
from tests.umt5.conftest import TINY_HF, to_wan_keys


@pytest.fixture(scope="module")
def hf_state(checkpoints) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in checkpoints["state"].items()}


@pytest.fixture(scope="module")
def wan_state(hf_state) -> dict[str, np.ndarray]:
    return to_wan_keys(hf_state)


def _save(tmp_path, state, config=None, name="model.safetensors"):
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp_path / name)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / name


def _same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- forms that load ---------------------------------------------------------------------------


def test_wan_safetensors_and_tied_embedding_name_load_like_the_pth(
    tmp_path, checkpoints, wan_state, hf_state
):
    config, reference = load_umt5(checkpoints["wan"], jnp.float32)
    (tmp_path / "wan").mkdir()
    (tmp_path / "hf").mkdir()
    config_st, params_st = load_umt5(_save(tmp_path / "wan", wan_state), jnp.float32)
    # Only the tied copy of the embedding, under its encoder name.
    only_tied = {
        ("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
        for k, v in hf_state.items()
        if k != "encoder.embed_tokens.weight"
    }
    config_hf, params_hf = load_umt5(_save(tmp_path / "hf", only_tied), jnp.float32)
    assert config == config_st == config_hf
    _same_params(reference, params_st)
    _same_params(reference, params_hf)


def test_sharded_hf_checkpoint_loads_with_and_without_index(tmp_path, hf_model, checkpoints):
    _, reference = load_umt5(checkpoints["wan"], jnp.float32)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    _same_params(reference, load_umt5(tmp_path / "sharded", jnp.float32)[1])
    for index in (tmp_path / "sharded").glob("*.index.json"):
        index.unlink()
    _same_params(reference, load_umt5(tmp_path / "sharded", jnp.float32)[1])


def test_config_json_sets_max_distance_and_eps(tmp_path, hf_state):
    hf = {**TINY_HF, "relative_attention_max_distance": 64, "layer_norm_epsilon": 1e-5}
    config, _ = load_umt5(_save(tmp_path, hf_state, hf), jnp.float32)
    assert (config.relative_attention_max_distance, config.eps) == (64, 1e-5)


def test_wan_model_folder_reads_its_t5_pth_not_the_dit(tmp_path, checkpoints):
    shutil.copy(checkpoints["wan"], tmp_path)
    _save(
        tmp_path,
        {"patch_embedding.weight": np.ones(3, np.float32)},
        name="diffusion_pytorch_model.safetensors",
    )
    config, _ = load_umt5(tmp_path, jnp.bfloat16)
    assert config.param_dtype == "bfloat16" and config.num_layers == 2


# -- paths and files ---------------------------------------------------------------------------


def test_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_umt5(tmp_path / "nope.pth")
    assert isinstance(info.value, CheckpointError)


def test_directory_without_weights_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no UMT5 weights found"):
        load_umt5(tmp_path)


def test_directory_with_two_indexes_is_rejected(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="several safetensors indexes"):
        load_umt5(tmp_path)


def test_file_of_unknown_kind_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="expected a .pth/.pt, .safetensors"):
        load_umt5(tmp_path / "weights.bin")


@pytest.mark.parametrize(
    "dtype,match", [("int8", "dtype must be one of"), ("no-such-dtype", "unknown dtype")]
)
def test_bad_dtype_is_rejected(checkpoints, dtype, match):
    with pytest.raises(CheckpointError, match=match):
        load_umt5(checkpoints["wan"], dtype)


# -- keys, shapes and config -------------------------------------------------------------------


def test_not_a_umt5_names_its_keys(tmp_path):
    with pytest.raises(CheckpointError, match="does not look like a UMT5 encoder.*'vae.w'"):
        load_umt5(_save(tmp_path, {"vae.w": np.ones(3, np.float32)}))


def test_mixed_layouts_are_rejected(tmp_path, wan_state, hf_state):
    with pytest.raises(CheckpointError, match="mixes Wan keys"):
        load_umt5(_save(tmp_path, {**wan_state, "shared.weight": hf_state["shared.weight"]}))


def test_missing_keys_are_listed(tmp_path, wan_state):
    broken = {k: v for k, v in wan_state.items() if k != "blocks.1.ffn.fc2.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1, .*'blocks.1.ffn.fc2.weight'"):
        load_umt5(_save(tmp_path, broken))


def test_t5_style_shared_position_bias_gets_a_hint(tmp_path, wan_state):
    t5 = {k: v for k, v in wan_state.items() if k != "blocks.1.pos_embedding.embedding.weight"}
    with pytest.raises(CheckpointError, match="one per layer"):
        load_umt5(_save(tmp_path, t5))


def test_decoder_keys_are_unexpected(tmp_path, hf_state):
    full = {**hf_state, "decoder.final_layer_norm.weight": np.ones(32, np.float32)}
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(1\): 'decoder.final_layer_norm.weight'"
    ):
        load_umt5(_save(tmp_path, full))


def test_unknown_wan_key_is_unexpected(tmp_path, wan_state):
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): 'blocks.0.attn.bias'"):
        load_umt5(_save(tmp_path, {**wan_state, "blocks.0.attn.bias": np.ones(3, np.float32)}))


def test_wrong_shapes_are_listed_and_cut_to_ten(tmp_path, wan_state):
    broken = dict(wan_state)
    broken["blocks.1.attn.o.weight"] = np.ones((32, 16), np.float32)
    one = pytest.raises(
        CheckpointError,
        match=r"wrong shapes \(1\): 'blocks.1.attn.o.weight' "
        r"expected \(32, 32\) found \(32, 16\)",
    )
    with one:
        load_umt5(_save(tmp_path, broken))
    for n in range(2):
        for k in ("norm1", "norm2"):
            broken[f"blocks.{n}.{k}.weight"] = np.ones(3, np.float32)
    for k in ("attn.k", "attn.v", "ffn.fc2", "attn.o"):
        broken[f"blocks.0.{k}.weight"] = np.ones((5, 5), np.float32)
    broken["blocks.1.ffn.gate.0.weight"] = np.ones((5, 5), np.float32)
    broken["norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(CheckpointError, match=r"wrong shapes \(11\): .* and 1 more"):
        load_umt5(_save(tmp_path, broken))


def test_config_needs_its_shape_keys(tmp_path, wan_state):
    broken = {k: v for k, v in wan_state.items() if k != "token_embedding.weight"}
    with pytest.raises(CheckpointError, match="cannot infer.*'token_embedding.weight'"):
        load_umt5(_save(tmp_path, broken))


def test_shape_key_of_wrong_rank_is_named(tmp_path, wan_state):
    broken = {**wan_state, "blocks.0.ffn.fc1.weight": np.ones(48, np.float32)}
    with pytest.raises(CheckpointError, match="'blocks.0.ffn.fc1.weight': expected a 2-d"):
        load_umt5(_save(tmp_path, broken))


def test_q_rows_must_split_over_heads(tmp_path, wan_state):
    broken = {**wan_state, "blocks.0.attn.q.weight": np.ones((30, 32), np.float32)}
    with pytest.raises(CheckpointError, match="30 rows is not a multiple of the 4 heads"):
        load_umt5(_save(tmp_path, broken))


def test_invalid_inferred_config_is_reported(tmp_path, wan_state):
    broken = {k: (v[:7] if "pos_embedding" in k else v) for k, v in wan_state.items()}
    with pytest.raises(CheckpointError, match="inferred config is invalid.*num_buckets"):
        load_umt5(_save(tmp_path, broken))


def test_config_json_that_disagrees_is_named(tmp_path, hf_state):
    with pytest.raises(CheckpointError, match="d_ff: config.json says 64, the weights say 48"):
        load_umt5(_save(tmp_path, hf_state, {**TINY_HF, "d_ff": 64}))


def test_non_gated_gelu_config_is_rejected(tmp_path, hf_state):
    with pytest.raises(CheckpointError, match="feed_forward_proj='relu'"):
        load_umt5(_save(tmp_path, hf_state, {**TINY_HF, "feed_forward_proj": "relu"}))


@pytest.mark.parametrize(
    "text,match", [("{oops", "is not valid JSON"), ("[1, 2]", "does not hold a JSON object")]
)
def test_broken_config_json_is_named(tmp_path, hf_state, text, match):
    path = _save(tmp_path, hf_state)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load_umt5(path)
