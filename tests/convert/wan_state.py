"""Random Wan2.1 DiT state dicts for tests, in the original and the diffusers key layout.

Written independently of `fpsa_jax.convert` (plain code, no shared tables) so that tests compare
the converter against a second implementation:
  make_original_state_dict(cfg_kwargs, seed) -> {original key: np.ndarray (float32)}
  to_diffusers_keys(state)                   -> same tensors under diffusers' names
  expected_params(state)                     -> our Flax tree, built by hand from `state`
  diffusers_model(cfg_kwargs, state)         -> diffusers' WanTransformer3DModel holding `state`
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tests.conftest import TINY_WAN

# The tests' tiny DiT (tests/conftest.py) as the fields a checkpoint's tensors determine.
TINY = {
    name: getattr(TINY_WAN, name)
    for name in (
        "dim",
        "num_heads",
        "ffn_dim",
        "num_layers",
        "in_dim",
        "out_dim",
        "text_dim",
        "freq_dim",
        "patch_size",
        "qk_norm",
        "cross_attn_norm",
    )
}


def make_original_state_dict(cfg_kwargs: Any = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A random float32 state dict of the original `WanModel` (wan/modules/model.py).

    `cfg_kwargs`: a dict of WanConfig fields (missing ones as in TINY) or a WanConfig. Every
    entry is non-zero (|x| >= 0.25 of its scale), the head included, so that no tensor can be
    confused with a freshly initialised one; scales follow 1/sqrt(fan_in) to keep activations
    of a forward pass in a sane range.
    """
    if dataclasses.is_dataclass(cfg_kwargs):
        cfg_kwargs = dataclasses.asdict(cfg_kwargs)
    c = {**TINY, **(cfg_kwargs or {})}
    d, f, pt, ph, pw = c["dim"], c["ffn_dim"], *c["patch_size"]
    rng = np.random.default_rng(seed)

    def rand(*shape, scale):
        magnitude = rng.uniform(0.25, 1.0, shape)
        return (np.where(rng.random(shape) < 0.5, -1.0, 1.0) * magnitude * scale).astype(np.float32)

    state: dict[str, np.ndarray] = {}

    def linear(name, n_in, n_out):
        state[f"{name}.weight"] = rand(n_out, n_in, scale=n_in**-0.5)
        state[f"{name}.bias"] = rand(n_out, scale=0.1)

    def norm(name, bias):
        state[f"{name}.weight"] = 1.0 + rand(d, scale=0.2)
        if bias:
            state[f"{name}.bias"] = rand(d, scale=0.1)

    fan_in = c["in_dim"] * pt * ph * pw
    state["patch_embedding.weight"] = rand(d, c["in_dim"], pt, ph, pw, scale=fan_in**-0.5)
    state["patch_embedding.bias"] = rand(d, scale=0.1)
    linear("text_embedding.0", c["text_dim"], d)
    linear("text_embedding.2", d, d)
    linear("time_embedding.0", c["freq_dim"], d)
    linear("time_embedding.2", d, d)
    linear("time_projection.1", d, 6 * d)
    for i in range(c["num_layers"]):
        b = f"blocks.{i}"
        state[f"{b}.modulation"] = rand(1, 6, d, scale=d**-0.5)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                linear(f"{b}.{attn}.{proj}", d, d)
            if c["qk_norm"]:
                norm(f"{b}.{attn}.norm_q", bias=False)
                norm(f"{b}.{attn}.norm_k", bias=False)
        if c["cross_attn_norm"]:
            norm(f"{b}.norm3", bias=True)
        linear(f"{b}.ffn.0", d, f)
        linear(f"{b}.ffn.2", f, d)
    state["head.modulation"] = rand(1, 2, d, scale=d**-0.5)
    linear("head.head", d, c["out_dim"] * pt * ph * pw)
    return state


# Substring renames in the order of REFERENCE.md (as diffusers' convert_wan_to_diffusers.py).
_TO_DIFFUSERS = (
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    ("modulation", "scale_shift_table"),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    # norm2 <-> norm3 (only norm3 has weights in the original, but swap both ways).
    (".norm2.", ".__norm_swap__."),
    (".norm3.", ".norm2."),
    (".__norm_swap__.", ".norm3."),
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
)


def to_diffusers_keys(state: dict[str, Any]) -> dict[str, Any]:
    """The same tensors under the names of diffusers' `WanTransformer3DModel`."""
    out = {}
    for key, value in state.items():
        for old, new in _TO_DIFFUSERS:
            key = key.replace(old, new)
        out[key] = value
    return out


def diffusers_model(cfg_kwargs: Any, state: dict[str, np.ndarray]):
    """diffusers' WanTransformer3DModel of `cfg_kwargs` (TINY's keys) in eval mode, loaded with
    the original-layout `state` renamed to diffusers keys (strict: every name must be real)."""
    import torch
    from diffusers import WanTransformer3DModel

    cfg = {**TINY, **(cfg_kwargs or {})}
    model = WanTransformer3DModel(
        patch_size=tuple(cfg["patch_size"]),
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["dim"] // cfg["num_heads"],
        in_channels=cfg["in_dim"],
        out_channels=cfg["out_dim"],
        text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"],
        ffn_dim=cfg["ffn_dim"],
        num_layers=cfg["num_layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_diffusers_keys(state).items()
    }
    model.load_state_dict(tensors, strict=True)
    return model


def expected_params(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """Our Flax parameter tree from an original-layout state dict, as numpy arrays."""

    def lin(name):
        return {"kernel": state[f"{name}.weight"].T, "bias": state[f"{name}.bias"]}

    conv = state["patch_embedding.weight"]  # [D, C, pt, ph, pw]
    num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    layers = []
    for i in range(num_layers):
        b = f"blocks.{i}"
        layer = {
            "modulation": state[f"{b}.modulation"][0],
            "ffn": {"fc1": lin(f"{b}.ffn.0"), "fc2": lin(f"{b}.ffn.2")},
        }
        for attn in ("self_attn", "cross_attn"):
            layer[attn] = {p: lin(f"{b}.{attn}.{p}") for p in "qkvo"}
            for n in ("norm_q", "norm_k"):
                if f"{b}.{attn}.{n}.weight" in state:
                    layer[attn][n] = {"scale": state[f"{b}.{attn}.{n}.weight"]}
        if f"{b}.norm3.weight" in state:
            layer["cross_attn_norm"] = {
                "scale": state[f"{b}.norm3.weight"],
                "bias": state[f"{b}.norm3.bias"],
            }
        layers.append(layer)
    return {
        "patch_embedding": {
            "kernel": conv.transpose(2, 3, 4, 1, 0).reshape(-1, conv.shape[0]),
            "bias": state["patch_embedding.bias"],
        },
        "text_embedding": {
            "linear_1": lin("text_embedding.0"),
            "linear_2": lin("text_embedding.2"),
        },
        "time_embedding": {
            "linear_1": lin("time_embedding.0"),
            "linear_2": lin("time_embedding.2"),
        },
        "time_projection": lin("time_projection.1"),
        "blocks": _stack(layers),
        "head": {"modulation": state["head.modulation"][0], "head": lin("head.head")},
    }


def _stack(trees: list[Any]) -> Any:
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)
