"""Every way a checkpoint can be rejected raises CheckpointError with a message that names it."""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.convert import CheckpointError, load_wan_checkpoint
from fpsa_jax.convert.safetensors_io import SafetensorsReader, read_header
from tests.convert.helpers import write_safetensors, write_sharded
from tests.convert.wan_state import to_diffusers_keys


def _load(tmp_path, state, dtype=jnp.float32, num_heads=2):
    path = write_safetensors(tmp_path / "model.safetensors", state)
    return load_wan_checkpoint(path, dtype, num_heads=num_heads)


def test_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_wan_checkpoint(tmp_path / "nope.safetensors")
    assert isinstance(info.value, CheckpointError)


def test_directory_without_weights_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        load_wan_checkpoint(tmp_path)


def test_file_of_unknown_kind_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="expected a .safetensors"):
        load_wan_checkpoint(tmp_path / "weights.bin")


def test_not_a_wan_dit_names_its_keys(tmp_path):
    with pytest.raises(CheckpointError, match="does not look like a Wan2.1 DiT.*'encoder.w'"):
        _load(tmp_path, {"encoder.w": np.ones(3, np.float32)})


def test_mixed_layouts_are_rejected(tmp_path, state):
    mixed = {**state, "proj_out.weight": state["head.head.weight"]}
    with pytest.raises(CheckpointError, match="mixes original Wan2.1 keys and diffusers"):
        _load(tmp_path, mixed)


def test_missing_keys_are_listed(tmp_path, state):
    broken = {k: v for k, v in state.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1, .*'blocks.1.ffn.2.bias'"):
        _load(tmp_path, broken)


def test_many_missing_keys_are_cut_to_ten(tmp_path, state):
    broken = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    broken["blocks.1.modulation"] = state["blocks.1.modulation"]
    with pytest.raises(CheckpointError, match=r"missing keys \(26, .* and 16 more") as info:
        _load(tmp_path, broken)
    assert "blocks.1.cross_attn.k.bias" in str(info.value)  # sorted, first ones shown


def test_missing_key_needed_for_inference(tmp_path, state):
    broken = {k: v for k, v in state.items() if k != "patch_embedding.weight"}
    with pytest.raises(CheckpointError, match="cannot infer.*'patch_embedding.weight'"):
        _load(tmp_path, broken)


def test_unexpected_keys_are_listed_in_both_layouts(tmp_path, state):
    extra = {**state, "blocks.0.self_attn.extra.weight": np.ones(2, np.float32)}
    with pytest.raises(
        CheckpointError,
        match=r"unexpected keys \(1\): "
        r"'blocks.0.self_attn.extra.weight'",
    ):
        _load(tmp_path, extra)
    extra = {**to_diffusers_keys(state), "blocks.0.attn1.mystery": np.ones(2, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): 'blocks.0.attn1.mystery'"):
        _load(tmp_path, extra)


def test_wrong_shape_names_key_expected_and_found(tmp_path, state):
    broken = dict(state)
    broken["blocks.1.self_attn.q.weight"] = np.ones((24, 20), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"'blocks.1.self_attn.q.weight' expected "
        r"\(24, 24\) found \(24, 20\)",
    ):
        _load(tmp_path, broken)
    broken = dict(to_diffusers_keys(state))  # named as in the file
    broken["blocks.0.attn2.to_out.0.bias"] = np.ones(5, np.float32)
    with pytest.raises(CheckpointError, match=r"'blocks.0.attn2.to_out.0.bias' expected \(24,\)"):
        _load(tmp_path, broken)


def test_head_not_divisible_by_patch_volume(tmp_path, state):
    broken = {**state, "head.head.weight": np.ones((15, 24), np.float32)}
    with pytest.raises(CheckpointError, match="not a multiple of the patch volume 4"):
        _load(tmp_path, broken)


def test_wrong_rank_of_an_inference_key(tmp_path, state):
    broken = {**state, "patch_embedding.weight": np.ones((24, 16), np.float32)}
    with pytest.raises(CheckpointError, match="'patch_embedding.weight': expected a 5-d"):
        _load(tmp_path, broken)


def test_missing_shard_is_named(tmp_path, state):
    index = write_sharded(tmp_path, state, num_shards=3)
    (tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match="missing.*'diffusion_pytorch_model-00002-of-00003.safetensors'"
    ) as info:
        load_wan_checkpoint(index)
    assert isinstance(info.value, CheckpointError)


def test_index_pointing_at_the_wrong_shard(tmp_path, state):
    index = write_sharded(tmp_path, state, num_shards=2)
    data = json.loads(index.read_text())
    weight_map = data["weight_map"]
    other = next(s for s in set(weight_map.values()) if s != weight_map["patch_embedding.bias"])
    weight_map["patch_embedding.bias"] = other
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'patch_embedding.bias' to shards that do not"):
        load_wan_checkpoint(index)


def test_malformed_index_is_rejected(tmp_path):
    (tmp_path / "m.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        load_wan_checkpoint(tmp_path / "m.safetensors.index.json")


@pytest.mark.parametrize(
    "key, diffusers",
    [
        ("blocks.0.cross_attn.k_img.weight", False),
        ("img_emb.proj.1.weight", False),
        ("blocks.1.attn2.add_k_proj.weight", True),
        ("condition_embedder.image_embedder.ff.net.0.proj.weight", True),
    ],
)
def test_image_to_video_keys_are_rejected(tmp_path, state, key, diffusers):
    file_state = to_diffusers_keys(state) if diffusers else dict(state)
    file_state[key] = np.ones((24, 24), np.float32)
    with pytest.raises(CheckpointError, match=f"image-to-video .* not supported.*'{key}'"):
        _load(tmp_path, file_state)


def test_image_to_video_config_json_is_rejected(tmp_path, state):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "i2v", "num_heads": 2}))
    with pytest.raises(CheckpointError, match="image-to-video.*config.json"):
        load_wan_checkpoint(tmp_path)


def test_num_heads_undeterminable(tmp_path, state):
    """Before: "pass num_heads (--num_heads)", also in `python -m infer --ckpt_dir`, which has no
    such flag. Now it names what works from every caller: the config.json, the convert CLI's
    flag and the Python argument."""
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path, state, num_heads=None)
    assert str(e.value).endswith(
        "cannot determine num_heads: no config.json beside the weights and dim=24 is not a "
        "multiple of the usual head dim 128: put the model's config.json (it names num_heads) "
        "beside the weights, or convert them with `python -m fpsa_jax.convert --num_heads N` "
        "(load_wan_checkpoint(..., num_heads=N) in Python)"
    )


def test_num_heads_argument_contradicting_config_json(tmp_path, state):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
    (tmp_path / "config.json").write_text(json.dumps({"dim": 24, "num_heads": 2}))
    with pytest.raises(CheckpointError, match="num_heads=3 was passed but config.json says 2"):
        load_wan_checkpoint(tmp_path, num_heads=3)


@pytest.mark.parametrize(
    "config_json, message",
    [
        (
            {"dim": 24, "num_heads": 2, "ffn_dim": 64},
            "ffn_dim: config.json says 64, the weights say 32",
        ),
        ({"num_attention_heads": 2, "attention_head_dim": 16}, "dim: config.json says 32"),
        ({"num_attention_heads": 2, "patch_size": [1, 1, 1]}, "patch_size"),
    ],
)
def test_config_json_disagreeing_with_shapes(tmp_path, state, config_json, message):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(CheckpointError, match=f"config.json disagrees.*{message}"):
        load_wan_checkpoint(tmp_path)


def test_invalid_inferred_config(tmp_path, state):
    with pytest.raises(CheckpointError, match="inferred config is invalid.*divisible"):
        _load(tmp_path, state, num_heads=5)


def test_unsupported_dtype(tmp_path, state):
    with pytest.raises(CheckpointError, match="dtype must be one of"):
        _load(tmp_path, state, dtype=jnp.int8)


def test_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "model.pth").write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(
        CheckpointError, match=r"legacy format needs torch \(pip install 'fpsa-jax\[convert\]'\)"
    ):
        load_wan_checkpoint(tmp_path / "model.pth")


def test_unreadable_pth_is_rejected(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "model.pth").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="could not be read by torch.load"):
        load_wan_checkpoint(tmp_path / "model.pth")


def test_directory_with_several_indexes_asks_which_one(tmp_path, state):
    write_sharded(tmp_path, state, stem="a")
    write_sharded(tmp_path, state, stem="b")
    with pytest.raises(CheckpointError, match="several safetensors indexes"):
        load_wan_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "text, message", [("{nope", "not valid JSON"), ("[1, 2]", "does not hold a JSON object")]
)
def test_broken_config_json_is_rejected(tmp_path, state, text, message):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_wan_checkpoint(tmp_path)


def test_missing_files_given_to_the_readers_directly(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors file not found"):
        read_header(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors index not found"):
        SafetensorsReader.from_index(tmp_path / "x.safetensors.index.json")


def test_pth_that_is_not_a_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save([torch.ones(2)], tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_wan_checkpoint(tmp_path / "model.pth")


def test_pth_wrapped_in_state_dict_key_is_unwrapped(tmp_path, state):
    torch = pytest.importorskip("torch")
    torch.save(
        {"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "model.pt"
    )
    config, _ = load_wan_checkpoint(tmp_path / "model.pt", num_heads=2)
    assert config.num_layers == 2


def test_unknown_dtype_name(tmp_path, state):
    with pytest.raises(CheckpointError, match="unknown dtype 'float7'"):
        _load(tmp_path, state, dtype="float7")
