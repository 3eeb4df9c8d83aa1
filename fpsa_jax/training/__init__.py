"""Quantization-aware flow-matching fine-tuning: config, sigma sampling, optimizer, train step, and
the measurement behind calibrated step schedules.

Pure functions only; the `train/` app does I/O, logging, checkpoints and sharding.
"""

from fpsa_jax.training.calibration import Sample, measure_step_errors
from fpsa_jax.training.config import TrainConfig
from fpsa_jax.training.flow import (
    add_noise,
    flow_matching_loss,
    sample_sigmas,
    sigma_cdf,
    sigma_from_u,
    timesteps_from_sigmas,
    velocity_target,
)
from fpsa_jax.training.optimizer import adamw_hyperparams, learning_rate_at, make_optimizer
from fpsa_jax.training.phases import (
    PhaseSample,
    PhaseTable,
    phase_attention,
    phase_table,
    sample_phase,
    sample_sigmas_in_phase,
)
from fpsa_jax.training.state import TrainState, init_train_state
from fpsa_jax.training.step import batch_loss, drop_text, train_step

__all__ = [
    "PhaseSample",
    "PhaseTable",
    "Sample",
    "TrainConfig",
    "TrainState",
    "adamw_hyperparams",
    "add_noise",
    "batch_loss",
    "drop_text",
    "flow_matching_loss",
    "init_train_state",
    "learning_rate_at",
    "make_optimizer",
    "measure_step_errors",
    "phase_attention",
    "phase_table",
    "sample_phase",
    "sample_sigmas",
    "sample_sigmas_in_phase",
    "sigma_cdf",
    "sigma_from_u",
    "timesteps_from_sigmas",
    "train_step",
    "velocity_target",
]
