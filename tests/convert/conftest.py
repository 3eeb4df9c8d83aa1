"""Fixtures of the conversion tests: tiny random checkpoints on disk in every supported form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.convert.wan_state import TINY, diffusers_model, make_original_state_dict


@pytest.fixture(scope="session")
def state() -> dict[str, np.ndarray]:
    """The tiny original-layout state dict (float32)."""
    return make_original_state_dict(TINY, seed=0)


@pytest.fixture(scope="session")
def diffusers_checkpoints(tmp_path_factory, state) -> dict[str, Path]:
    """`state` loaded into a real diffusers WanTransformer3DModel (strict, so our diffusers names
    are the real ones) and saved with `save_pretrained`: single file, sharded, pipeline root."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    model = diffusers_model(TINY, state)
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
