"""The embedded demo model: a small pixel-space Wan DiT on captioned moving shapes, its
checkpoints, the analytic evaluator that reads attributes back from videos, and sampling."""

from fpsa_jax.demo.checkpoint import (
    DEFAULT_CHECKPOINT,
    DENSE_CHECKPOINT,
    DemoCheckpoint,
    Sampling,
    is_demo_checkpoint,
    load_demo,
    save_demo,
)

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DENSE_CHECKPOINT",
    "DemoCheckpoint",
    "Sampling",
    "is_demo_checkpoint",
    "load_demo",
    "save_demo",
]
