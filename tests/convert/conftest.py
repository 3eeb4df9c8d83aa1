"""Fixtures of the conversion tests: tiny random checkpoints on disk in every supported form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.convert.wan_state import TINY, make_original_state_dict, to_diffusers_keys


@pytest.fixture(scope="session")
def state() -> dict[str, np.ndarray]:
    """The tiny original-layout state dict (float32)."""
    return make_original_state_dict(TINY, seed=0)


@pytest.fixture(scope="session")
def diffusers_checkpoints(tmp_path_factory, state) -> dict[str, Path]:
    """`state` loaded into a real diffusers WanTransformer3DModel (strict, so our diffusers names
    are the real ones) and saved with `save_pretrained`: single file, sharded, pipeline root."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in to_diffusers_keys(state).items()}, strict=True
    )
    root = tmp_path_factory.mktemp("diffusers")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    model.save_pretrained(root / "pipeline" / "transformer", max_shard_size="20KB")
    (root / "pipeline" / "model_index.json").write_text("{}")
    torch.save(model.state_dict(), root / "model.pth")
    return {
        "single": root / "single",
        "sharded": root / "sharded",
        "pipeline": root / "pipeline",
        "pth": root / "model.pth",
    }
